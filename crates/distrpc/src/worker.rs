//! Workers: [`WorkerInfo`], name rules, and the ways to name a destination ([`To`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A worker of the group: its unique name and its rank (torch's `WorkerInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker's rank, `0..world_size`.
    pub id: u32,
    /// The worker's unique name.
    pub name: String,
}

impl fmt::Display for WorkerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerInfo(id={}, name={})", self.id, self.name)
    }
}

/// Checks torch's rule for worker names: non-empty, under 128 characters, only
/// `A-Z a-z 0-9 - _ :`.
pub fn check_name(name: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "worker name {name:?} {why}"
        )))
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() >= 128 {
        return bad("is 128 characters or longer");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':')))
    {
        return bad(&format!(
            "contains {c:?}; only A-Z, a-z, 0-9, '-', '_' and ':' are allowed"
        ));
    }
    Ok(())
}

/// A destination: a worker given by name, by rank, or by [`WorkerInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum To {
    /// By name.
    Name(String),
    /// By rank.
    Rank(u32),
}

impl fmt::Display for To {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            To::Name(n) => write!(f, "{n:?}"),
            To::Rank(r) => write!(f, "rank {r}"),
        }
    }
}

impl From<&str> for To {
    fn from(s: &str) -> Self {
        To::Name(s.to_string())
    }
}
impl From<String> for To {
    fn from(s: String) -> Self {
        To::Name(s)
    }
}
impl From<&String> for To {
    fn from(s: &String) -> Self {
        To::Name(s.clone())
    }
}
impl From<u32> for To {
    fn from(r: u32) -> Self {
        To::Rank(r)
    }
}
impl From<usize> for To {
    fn from(r: usize) -> Self {
        To::Rank(u32::try_from(r).unwrap_or(u32::MAX))
    }
}
impl From<i32> for To {
    fn from(r: i32) -> Self {
        To::Rank(u32::try_from(r).unwrap_or(u32::MAX))
    }
}
impl From<&WorkerInfo> for To {
    fn from(w: &WorkerInfo) -> Self {
        To::Rank(w.id)
    }
}
impl From<WorkerInfo> for To {
    fn from(w: WorkerInfo) -> Self {
        To::Rank(w.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_torch_rules() {
        for ok in ["worker0", "ps", "trainer-1", "a_b:c", &"x".repeat(127)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "has space", "dot.name", "ü", &"x".repeat(128)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
