//! One rule for secrets in output: a URL's password (and any `password=`,
//! `token=` or `secret=` query value) is replaced by `***` wherever a URL
//! is shown — errors, log lines, `Debug`, status output. Text from other
//! libraries goes through [`text`] before it is shown.

use std::fmt;

/// What replaces a secret.
pub const MASK: &str = "***";

/// `url` with its password and secret query values masked.
pub fn url(url: &str) -> String {
    text(url)
}

/// `text` with the password of every URL in it masked, and the values of
/// `password=`, `passwd=`, `token=` and `secret=` parameters.
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority ends at the first '/', '?', '#' or whitespace.
        let end = after
            .find(|c: char| {
                c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == '\''
            })
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push(':');
                        out.push_str(MASK);
                    }
                    // NATS puts a bare token where a user name goes.
                    None if is_nats(before) => out.push_str(MASK),
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    mask_parameters(&out)
}

/// Whether the text before `://` ends in a NATS scheme.
fn is_nats(before: &str) -> bool {
    let scheme = before.trim_end_matches("://");
    let start = scheme
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+'))
        .map_or(0, |at| at + 1);
    matches!(&scheme[start..], "nats" | "tls" | "ws" | "wss")
}

fn mask_parameters(text: &str) -> String {
    const KEYS: [&str; 5] = ["password=", "passwd=", "pwd=", "token=", "secret="];
    let mut out = String::with_capacity(text.len());
    let lower = text.to_ascii_lowercase();
    let mut i = 0;
    while i < text.len() {
        let hit = KEYS.iter().find(|key| {
            lower[i..].starts_with(*key)
                && (i == 0 || matches!(text.as_bytes()[i - 1], b'?' | b'&' | b' ' | b';'))
        });
        match hit {
            Some(key) => {
                out.push_str(&text[i..i + key.len()]);
                i += key.len();
                let end = text[i..]
                    .find(|c: char| c == '&' || c == ';' || c.is_whitespace())
                    .map_or(text.len(), |end| i + end);
                if end > i {
                    out.push_str(MASK);
                }
                i = end;
            }
            None => {
                let c = text[i..].chars().next().unwrap_or(' ');
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// A string that must never be printed whole (a URL with credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the connection that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", url(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&url(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nats_token_is_masked_a_user_name_elsewhere_is_not() {
        assert_eq!(
            url("nats://s3cretT0ken@h:4222"),
            format!("nats://{MASK}@h:4222")
        );
        assert_eq!(url("tls://u:pw@h:4222"), format!("tls://u:{MASK}@h:4222"));
        assert_eq!(url("amqp://guest@h/v"), "amqp://guest@h/v");
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(
            url("amqp://guest:Sup3rS3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(url("postgres://app@db/app"), "postgres://app@db/app");
        assert_eq!(url("sqlite://x.db?mode=rwc"), "sqlite://x.db?mode=rwc");
        assert_eq!(
            text("cannot open \"postgress://app:p@ss:w0rd@db/app\" now"),
            "cannot open \"postgress://app:***@db/app\" now"
        );
        assert_eq!(
            url("mysql://root:pw@h/db?password=also&ssl-mode=off"),
            "mysql://root:***@h/db?password=***&ssl-mode=off"
        );
        assert!(!format!("{:?}", Secret::new("amqp://u:hunter2@h")).contains("hunter2"));
    }
}
