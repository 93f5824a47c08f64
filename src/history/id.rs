//! [`CheckpointId`]: the id of a checkpoint (its git commit id), as the rest of coin sees it.

use std::fmt;
use std::str::FromStr;

use git2::Oid;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A checkpoint's id: the id of its git commit. Displays as the full 40 hex digits; [`short`]
/// gives the 12-digit form coin prints in tables and messages. Serialises as the hex string.
///
/// [`short`]: CheckpointId::short
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckpointId(Oid);

impl CheckpointId {
    /// Hex digits of the short form.
    pub const SHORT_LEN: usize = 12;

    /// The 12-hex-digit short form.
    pub fn short(&self) -> String {
        let mut s = self.0.to_string();
        s.truncate(Self::SHORT_LEN);
        s
    }

    /// The git object id (for code that talks to git).
    pub fn oid(&self) -> Oid {
        self.0
    }

    /// Parse a full 40-hex-digit id (not a prefix: revisions are [`crate::history::CoinRepo::resolve`]'s).
    pub fn from_hex(text: &str) -> Result<Self, InvalidCheckpointId> {
        text.parse()
    }
}

impl From<Oid> for CheckpointId {
    fn from(oid: Oid) -> Self {
        CheckpointId(oid)
    }
}

impl From<CheckpointId> for Oid {
    fn from(id: CheckpointId) -> Self {
        id.0
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Text that is not a full checkpoint id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{}' is not a checkpoint id (40 hex digits)", text.escape_debug())]
pub struct InvalidCheckpointId {
    /// The text (at most 80 characters of it).
    pub text: String,
}

impl FromStr for CheckpointId {
    type Err = InvalidCheckpointId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidCheckpointId {
            text: s.chars().take(80).collect(),
        };
        if s.len() != 40 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Oid::from_str(s).map(CheckpointId).map_err(|_| bad())
    }
}

impl Serialize for CheckpointId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CheckpointId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_and_serde() {
        let hex = "0123456789abcdef0123456789abcdef01234567";
        let id: CheckpointId = hex.parse().expect("a full id parses");
        assert_eq!(id.to_string(), hex);
        assert_eq!(id.short(), "0123456789ab");
        assert_eq!(
            serde_json::to_string(&id).expect("json"),
            format!("\"{hex}\"")
        );
        let back: CheckpointId = serde_json::from_str(&format!("\"{hex}\"")).expect("parse");
        assert_eq!(back, id);
        assert_eq!(CheckpointId::from(id.oid()), id);
        for bad in [
            "",
            "0123",
            "zz23456789abcdef0123456789abcdef01234567",
            &format!("{hex}0"),
        ] {
            assert!(bad.parse::<CheckpointId>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<CheckpointId>("\"nope\"").is_err());
    }
}
