//! `Key`: the 32-byte blake3 digest that names a store entry.
//!
//! The store never computes keys itself; callers hash whatever defines an
//! artifact and hand the digest over. A key is shown and serialized as 64
//! lowercase hex characters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::StoreError;

/// An opaque 32-byte digest naming one store entry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key([u8; 32]);

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Key {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Key {
        Key(b)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Wraps a finished blake3 hash.
    pub fn from_hash(h: blake3::Hash) -> Key {
        Key(*h.as_bytes())
    }

    /// The first 12 hex characters, for logs and messages.
    pub fn short(&self) -> String {
        let mut s = self.hex();
        s.truncate(12);
        s
    }

    /// All 64 lowercase hex characters.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl FromStr for Key {
    type Err = StoreError;

    /// Parses exactly 64 hex characters, either case.
    fn from_str(s: &str) -> Result<Key, StoreError> {
        let bad = || StoreError::BadKey {
            text: s.to_string(),
        };
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = nibble(pair[0]).ok_or_else(bad)?;
            let lo = nibble(pair[1]).ok_or_else(bad)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Key(out))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";

    #[test]
    fn pinned_hex_of_abc() {
        let k = Key::from_hash(blake3::hash(b"abc"));
        assert_eq!(k.hex(), ABC);
        assert_eq!(k.to_string(), ABC);
        assert_eq!(format!("{k:?}"), ABC);
        assert_eq!(k.short(), "6437b3ac3846");
    }

    #[test]
    fn hex_round_trip() -> Result<(), StoreError> {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(5);
        }
        let k = Key::from_bytes(bytes);
        let back: Key = k.hex().parse()?;
        assert_eq!(back, k);
        assert_eq!(back.as_bytes(), &bytes);
        let upper: Key = k.hex().to_uppercase().parse()?;
        assert_eq!(upper, k);
        Ok(())
    }

    #[test]
    fn rejects_bad_text() {
        for text in [
            "",
            "abc",
            &ABC[..63],
            &format!("{ABC}0"),
            &format!("{}g", &ABC[..63]),
        ] {
            match text.parse::<Key>() {
                Err(StoreError::BadKey { text: t }) => assert_eq!(t, text),
                other => panic!("{text:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn serde_as_hex_string() -> Result<(), serde_json::Error> {
        let k = Key::from_hash(blake3::hash(b"abc"));
        let json = serde_json::to_string(&k)?;
        assert_eq!(json, format!("\"{ABC}\""));
        let back: Key = serde_json::from_str(&json)?;
        assert_eq!(back, k);
        assert!(serde_json::from_str::<Key>("\"xyz\"").is_err());
        assert!(serde_json::from_str::<Key>("42").is_err());
        Ok(())
    }

    #[test]
    fn ordering_follows_bytes() {
        let a = Key::from_bytes([0; 32]);
        let mut b = [0; 32];
        b[31] = 1;
        assert!(a < Key::from_bytes(b));
    }
}
