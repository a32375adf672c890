//! Identifier newtypes for tenants, principals, runs and correlation ids: parsed once, never re-validated.

use std::fmt;
use std::str::FromStr;

use ulid::Ulid;

/// Why an identifier did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The text was empty.
    #[error("{kind} is empty")]
    Empty {
        /// Which identifier was being parsed.
        kind: &'static str,
    },
    /// The text was longer than the identifier allows.
    #[error("{kind} is longer than {max} bytes")]
    TooLong {
        /// Which identifier was being parsed.
        kind: &'static str,
        /// The limit.
        max: usize,
    },
    /// The text held a character the identifier does not allow.
    #[error("{kind} contains a character that is not allowed")]
    BadCharacter {
        /// Which identifier was being parsed.
        kind: &'static str,
    },
    /// The text did not have the identifier's shape (prefix, ULID body).
    #[error("{kind} is malformed: {why}")]
    Malformed {
        /// Which identifier was being parsed.
        kind: &'static str,
        /// What was wrong.
        why: &'static str,
    },
}

/// An opaque tenant identifier: `t_` followed by a ULID.
///
/// It is opaque on purpose: it says nothing about the workspace, so it can appear in metrics labels and
/// storage keys without revealing a customer.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    const PREFIX: &'static str = "t_";

    /// Mints a fresh tenant id. Only provisioning calls this.
    pub(crate) fn generate() -> Self {
        TenantId(format!("{}{}", Self::PREFIX, Ulid::new()))
    }

    /// The id as text, for keys and logs.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TenantId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        const KIND: &str = "tenant id";
        let body = s.strip_prefix(Self::PREFIX).ok_or(IdError::Malformed {
            kind: KIND,
            why: "it must start with t_",
        })?;
        let ulid = Ulid::from_string(body).map_err(|_| IdError::Malformed {
            kind: KIND,
            why: "the part after t_ must be a ULID",
        })?;
        // Normalise to the canonical upper-case ULID so two spellings never name two tenants.
        Ok(TenantId(format!("{}{}", Self::PREFIX, ulid)))
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

/// A run identifier: a ULID minted when a run (or any other unit of audited work) starts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(Ulid);

impl RunId {
    /// Mints a fresh run id.
    pub fn generate() -> Self {
        RunId(Ulid::new())
    }
}

impl FromStr for RunId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        Ulid::from_string(s)
            .map(RunId)
            .map_err(|_| IdError::Malformed {
                kind: "run id",
                why: "it must be a ULID",
            })
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", self.0)
    }
}

/// Checks a short printable token: non-empty, bounded, and free of whitespace and control characters,
/// so that it can be a storage-key segment and a log field without escaping.
fn check_token(kind: &'static str, s: &str, max: usize, extra: &[char]) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    let ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || extra.contains(&c));
    if !ok {
        return Err(IdError::BadCharacter { kind });
    }
    Ok(())
}

/// A principal: who acts inside a tenant, qualified by where the identity comes from,
/// such as `slack:U024BE7LH`, `discord:80351110224678912` or `key:ak_01H…`.
///
/// The qualifier keeps a Slack user id and a Discord user id that happen to share digits apart.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrincipalId(String);

impl PrincipalId {
    /// Builds a principal id from a source qualifier and the source's own id.
    ///
    /// # Errors
    /// [`IdError`] when either part is empty, too long or holds a character outside `[A-Za-z0-9._-]`.
    pub fn qualified(source: &str, id: &str) -> Result<Self, IdError> {
        check_token("principal source", source, 16, &[])?;
        check_token("principal id", id, 128, &[])?;
        Ok(PrincipalId(format!("{source}:{id}")))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PrincipalId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let (source, id) = s.split_once(':').ok_or(IdError::Malformed {
            kind: "principal id",
            why: "it must be <source>:<id>",
        })?;
        PrincipalId::qualified(source, id)
    }
}

impl fmt::Display for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrincipalId({})", self.0)
    }
}

/// A correlation id handed to us by the platform (Slack's trigger_id or event_id, Discord's
/// interaction or message id), so an auditor can tie a run back to the platform's own records.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(String);

impl CorrelationId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CorrelationId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        // Slack trigger ids contain dots; event ids are alphanumeric; Discord ids are decimal.
        check_token("correlation id", s, 256, &[':'])?;
        Ok(CorrelationId(s.to_owned()))
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CorrelationId({})", self.0)
    }
}

/// A capability scope granted to a run, such as `agent:invoke` or `audit:read`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Scope(String);

impl Scope {
    /// The scope as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Scope {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        check_token("scope", s, 64, &[':'])?;
        Ok(Scope(s.to_owned()))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_id_round_trips_and_normalises() {
        let id = TenantId::generate();
        let parsed: TenantId = id.as_str().parse().unwrap();
        assert_eq!(parsed, id);
        let lower = format!("t_{}", &id.as_str()[2..].to_ascii_lowercase());
        assert_eq!(lower.parse::<TenantId>().unwrap(), id);
    }

    #[test]
    fn tenant_id_rejects_bad_forms() {
        for bad in [
            "",
            "t_",
            "x_01HZY3J5K6M7N8P9Q0R1S2T3V4",
            "t_not-a-ulid",
            "01HZY3J5K6M7N8P9Q0R1S2T3V4",
        ] {
            assert!(bad.parse::<TenantId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn principal_ids_are_qualified_and_checked() {
        let p: PrincipalId = "slack:U024BE7LH".parse().unwrap();
        assert_eq!(p.as_str(), "slack:U024BE7LH");
        assert_eq!(
            PrincipalId::qualified("discord", "8035").unwrap().as_str(),
            "discord:8035"
        );
        for bad in [
            "U024",
            "slack:",
            ":U1",
            "slack:U 1",
            "slack:U1/../x",
            "sl ack:U1",
        ] {
            assert!(bad.parse::<PrincipalId>().is_err(), "{bad:?} parsed");
        }
        let long = format!("slack:{}", "a".repeat(129));
        assert!(matches!(
            long.parse::<PrincipalId>(),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn correlation_ids_accept_platform_shapes_only() {
        assert!("13345224609.738474920.8088930838d88f008e0"
            .parse::<CorrelationId>()
            .is_ok());
        assert!("Ev0PV52K21".parse::<CorrelationId>().is_ok());
        assert!("".parse::<CorrelationId>().is_err());
        assert!("a\nb".parse::<CorrelationId>().is_err());
    }
}
