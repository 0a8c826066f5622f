//! Body encodings, identical to Django's serializer + `DjangoJSONEncoder`.
//!
//! `#[derive(Publish)]` encodes each field with [`BodyValue`] when the type
//! implements it, and falls back to `serde::Serialize` otherwise.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use uuid::Uuid;

/// A value with a fixed wire encoding in message bodies.
pub trait BodyValue {
    /// The JSON the Python library would produce for the same value.
    fn to_body_value(&self) -> Value;
}

macro_rules! number {
    ($($t:ty),*) => {$(
        impl BodyValue for $t {
            fn to_body_value(&self) -> Value {
                Value::from(*self)
            }
        }
    )*};
}
number!(
    i8, i16, i32, i64, u8, u16, u32, u64, isize, usize, f32, f64, bool
);

impl BodyValue for str {
    fn to_body_value(&self) -> Value {
        Value::String(self.to_owned())
    }
}

impl BodyValue for String {
    fn to_body_value(&self) -> Value {
        Value::String(self.clone())
    }
}

/// Decimals travel as strings, scale kept (`"12.50"`).
impl BodyValue for Decimal {
    fn to_body_value(&self) -> Value {
        Value::String(self.to_string())
    }
}

/// UUIDs travel hyphenated, lowercase.
impl BodyValue for Uuid {
    fn to_body_value(&self) -> Value {
        Value::String(self.hyphenated().to_string())
    }
}

/// ISO 8601, milliseconds, `Z` for UTC.
impl BodyValue for DateTime<Utc> {
    fn to_body_value(&self) -> Value {
        Value::String(iso_datetime(&self.naive_utc(), Some(0)))
    }
}

/// ISO 8601, milliseconds, `Z` for a zero offset and `+HH:MM` otherwise.
impl BodyValue for DateTime<FixedOffset> {
    fn to_body_value(&self) -> Value {
        Value::String(iso_datetime(
            &self.naive_local(),
            Some(self.offset().local_minus_utc()),
        ))
    }
}

/// ISO 8601, milliseconds, no offset (Django with `USE_TZ = False`).
impl BodyValue for NaiveDateTime {
    fn to_body_value(&self) -> Value {
        Value::String(iso_datetime(self, None))
    }
}

/// `YYYY-MM-DD`.
impl BodyValue for NaiveDate {
    fn to_body_value(&self) -> Value {
        Value::String(self.format("%Y-%m-%d").to_string())
    }
}

/// `HH:MM:SS[.mmm]`.
impl BodyValue for NaiveTime {
    fn to_body_value(&self) -> Value {
        let mut text = self.format("%H:%M:%S").to_string();
        push_millis(&mut text, self.nanosecond());
        Value::String(text)
    }
}

impl BodyValue for Value {
    fn to_body_value(&self) -> Value {
        self.clone()
    }
}

impl<T: BodyValue> BodyValue for Option<T> {
    fn to_body_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, BodyValue::to_body_value)
    }
}

impl<T: BodyValue + ?Sized> BodyValue for &T {
    fn to_body_value(&self) -> Value {
        (**self).to_body_value()
    }
}

/// Binary columns travel base64-encoded, as Django's `BinaryField` does.
impl BodyValue for Vec<u8> {
    fn to_body_value(&self) -> Value {
        Value::String(base64(self))
    }
}

/// The format of `DjangoJSONEncoder` for datetimes: microseconds cut to
/// milliseconds and left out entirely when zero, `+00:00` written `Z`.
pub(crate) fn iso_datetime(local: &NaiveDateTime, offset_seconds: Option<i32>) -> String {
    let mut text = local.format("%Y-%m-%dT%H:%M:%S").to_string();
    push_millis(&mut text, local.nanosecond());
    match offset_seconds {
        None => {}
        Some(0) => text.push('Z'),
        Some(seconds) => {
            let sign = if seconds < 0 { '-' } else { '+' };
            let minutes = seconds.unsigned_abs() / 60;
            text.push_str(&format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60));
        }
    }
    text
}

fn push_millis(text: &mut String, nanos: u32) {
    // Python's isoformat omits the fraction when microseconds are zero.
    let micros = (nanos % 1_000_000_000) / 1_000;
    if micros != 0 {
        text.push_str(&format!(".{:03}", micros / 1_000));
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Autoref specialization used by the derive: `(&&Encoder(&field)).encode()`
/// picks [`BodyValue`] when the field's type has it, `Serialize` otherwise.
#[doc(hidden)]
#[derive(Debug)]
pub struct Encoder<'a, T: ?Sized>(pub &'a T);

#[doc(hidden)]
pub trait ViaBodyValue {
    fn encode(&self) -> Result<Value, serde_json::Error>;
}

impl<T: BodyValue + ?Sized> ViaBodyValue for &Encoder<'_, T> {
    fn encode(&self) -> Result<Value, serde_json::Error> {
        Ok(self.0.to_body_value())
    }
}

#[doc(hidden)]
pub trait ViaSerialize {
    fn encode(&self) -> Result<Value, serde_json::Error>;
}

impl<T: serde::Serialize + ?Sized> ViaSerialize for Encoder<'_, T> {
    fn encode(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn datetimes_match_django() {
        let at = Utc.with_ymd_and_hms(2025, 1, 31, 14, 5, 9).unwrap();
        assert_eq!(at.to_body_value(), "2025-01-31T14:05:09Z");
        let at = at + chrono::Duration::microseconds(123_456);
        assert_eq!(at.to_body_value(), "2025-01-31T14:05:09.123Z");
        let at = Utc.with_ymd_and_hms(2025, 1, 31, 14, 5, 9).unwrap()
            + chrono::Duration::microseconds(500);
        assert_eq!(at.to_body_value(), "2025-01-31T14:05:09.000Z");
        let offset = FixedOffset::east_opt(-3 * 3600).unwrap();
        let local = offset.with_ymd_and_hms(2025, 1, 31, 11, 5, 9).unwrap();
        assert_eq!(local.to_body_value(), "2025-01-31T11:05:09-03:00");
        assert_eq!(at.naive_utc().to_body_value(), "2025-01-31T14:05:09.000");
    }

    #[test]
    fn scalars_match_django() {
        assert_eq!(Decimal::new(1250, 2).to_body_value(), "12.50");
        let id = Uuid::parse_str("3F2A8C3E-2B7D-4B8E-9A51-6C8D1A0F6F10").unwrap();
        assert_eq!(id.to_body_value(), "3f2a8c3e-2b7d-4b8e-9a51-6c8d1a0f6f10");
        assert_eq!(
            NaiveDate::from_ymd_opt(2025, 2, 3).unwrap().to_body_value(),
            "2025-02-03"
        );
        assert_eq!(
            NaiveTime::from_hms_milli_opt(4, 5, 6, 789)
                .unwrap()
                .to_body_value(),
            "04:05:06.789"
        );
        assert_eq!(None::<i32>.to_body_value(), Value::Null);
        assert_eq!(b"hello".to_vec().to_body_value(), "aGVsbG8=");
        assert_eq!(b"hi".to_vec().to_body_value(), "aGk=");
    }
}
