//! `Secret`: a password as the configuration holds it.
//!
//! Invariant: the value never leaves through `Debug`, `Display` or a deserialisation error;
//! both formatters print `***`, and a value of the wrong type in the file is reported without
//! echoing it. The only way to the text is `expose()`, called at the single point where a
//! password goes on the wire (etcd authentication, the PostgreSQL check, a VRRPv2 advert), so
//! a `grep expose` lists every place a secret is used.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A password or other credential: printed as `***`, read with `expose()`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one call that sends it; never for logs or messages.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecretVisitor)
    }
}

/// Accepts a string only. serde's default `visit_*` errors quote the unexpected value
/// ("invalid type: integer `12345`"); every other type is refused here without it.
struct SecretVisitor;

const NOT_A_STRING: &str = "a password must be a quoted string (value not shown)";

impl<'de> de::Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret::new(v))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_char<E: de::Error>(self, v: char) -> Result<Secret, E> {
        Ok(Secret(v.to_string()))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_none<E: de::Error>(self) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(de::Error::custom(NOT_A_STRING))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(de::Error::custom(NOT_A_STRING))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatters_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn wrong_types_are_refused_without_the_value() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct T {
            password: Secret,
        }
        for (text, hidden) in [
            ("password = 98765432", "98765432"),
            ("password = 9876.5432", "9876.5432"),
            ("password = true", "true"),
            ("password = [\"inarray77\"]", "inarray77"),
            ("password = { v = \"intable77\" }", "intable77"),
            ("password = 1979-05-27T07:32:00Z", "1979-05-27"),
        ] {
            let e = toml::from_str::<T>(text).unwrap_err();
            assert!(!e.message().contains(hidden), "{text}: {}", e.message());
            assert!(e.message().contains("value not shown"), "{text}: {}", e.message());
        }
        let t: T = toml::from_str("password = \"ok\"").unwrap();
        assert_eq!(t.password.expose(), "ok");
    }
}
