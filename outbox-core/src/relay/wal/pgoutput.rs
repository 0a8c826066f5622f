//! The few pgoutput (protocol version 1) messages the relay needs from the
//! replication stream: a table's columns (`Relation`) and its new rows
//! (`Insert`). Begin, Commit and logical messages are decoded by
//! pgwire-replication; everything else (updates, deletes, types, origins,
//! truncates) is not the outbox's business and is skipped.

/// A decoded change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// The columns of table `id`, sent before its first change in a session.
    Relation(u32, Relation),
    /// A new row of table `relation`: one text value per column, `None` for NULL.
    Insert {
        relation: u32,
        values: Vec<Option<String>>,
    },
    /// Anything else.
    Other,
}

/// A table as pgoutput describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub(crate) schema: String,
    pub(crate) name: String,
    pub(crate) columns: Vec<String>,
}

impl Relation {
    /// Where column `name` is in a row of this table.
    pub(crate) fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// Decode one pgoutput message; `Err` names what was malformed.
pub(crate) fn decode(data: &[u8]) -> Result<Change, String> {
    let mut input = Input(data);
    match input.byte()? {
        b'R' => {
            let id = input.u32()?;
            let schema = input.cstring()?;
            let name = input.cstring()?;
            let _replica_identity = input.byte()?;
            let count = input.u16()?;
            let mut columns = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let _flags = input.byte()?;
                columns.push(input.cstring()?);
                let _type_oid = input.u32()?;
                let _type_modifier = input.u32()?;
            }
            Ok(Change::Relation(
                id,
                Relation {
                    schema,
                    name,
                    columns,
                },
            ))
        }
        b'I' => {
            let relation = input.u32()?;
            if input.byte()? != b'N' {
                return Err("an insert without its new tuple".to_owned());
            }
            let count = input.u16()?;
            let mut values = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                values.push(match input.byte()? {
                    b'n' | b'u' => None,
                    b't' => {
                        let len = input.u32()? as usize;
                        let bytes = input.take(len)?;
                        Some(
                            String::from_utf8(bytes.to_vec())
                                .map_err(|_| "a text value that is not UTF-8".to_owned())?,
                        )
                    }
                    other => {
                        return Err(format!(
                            "a column value of kind {:?} (only text output is requested)",
                            other as char
                        ));
                    }
                });
            }
            Ok(Change::Insert { relation, values })
        }
        _ => Ok(Change::Other),
    }
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: wanted {n} bytes, {} left",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstring(&mut self) -> Result<String, String> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| "a name without its terminating zero".to_owned())?;
        let text = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_message() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16_384u32.to_be_bytes());
        m.extend(b"public\0published\0");
        m.push(b'd');
        m.extend(2u16.to_be_bytes());
        for name in ["id", "body"] {
            m.push(1);
            m.extend(name.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    #[test]
    fn relations_and_inserts_decode() {
        let Change::Relation(id, relation) = decode(&relation_message()).unwrap() else {
            panic!("not a relation");
        };
        assert_eq!(id, 16_384);
        assert_eq!(relation.name, "published");
        assert_eq!(relation.column("body"), Some(1));
        let mut insert = vec![b'I'];
        insert.extend(16_384u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(2u16.to_be_bytes());
        insert.push(b't');
        insert.extend(3u32.to_be_bytes());
        insert.extend(b"abc");
        insert.push(b'n');
        assert_eq!(
            decode(&insert).unwrap(),
            Change::Insert {
                relation: 16_384,
                values: vec![Some("abc".to_owned()), None]
            }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let full = relation_message();
        for len in 1..full.len() {
            assert!(decode(&full[..len]).is_err(), "{len} bytes");
        }
        assert!(decode(&[]).is_err());
        assert_eq!(decode(b"D\0\0").unwrap(), Change::Other);
    }
}
