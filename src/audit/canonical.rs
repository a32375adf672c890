//! A one-pass check that bytes are canonical event JSON, building no value: the verifier's hot loop.
//!
//! It answers exactly what `event::is_canonical` answers (parse with serde_json, re-encode with
//! `event::canonical_json`, compare), which the property tests below hold it to, but reads each byte
//! once and allocates only for keys with escapes. Measured on 10^6 events it removes most of the
//! 2 µs a line that parsing to `serde_json::Value` (an IndexMap per object, a String per key and
//! string) cost `bundle::verify` (docs/PERFORMANCE.md).
//!
//! Canonical form (docs/AUDIT-FORMAT.md): no whitespace; object members in strictly increasing byte
//! order of their decoded keys; integers only, that fit an i64 or a u64, with no `-0`, no leading
//! zero, no fraction or exponent; strings escaped as serde_json escapes them (`\"`, `\\`, `\b`, `\f`,
//! `\n`, `\r`, `\t`, `\u00xx` in lower-case hex for the other control characters, and nothing else).

use std::borrow::Cow;

/// serde_json refuses input nested this deep (its recursion limit), so no canonical text is.
const MAX_DEPTH: u32 = 127;

/// The kind of a top-level member's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `null`.
    Null,
    /// A string; its text is [`Member::text`].
    String,
    /// Anything else: a number, a boolean, an array or an object, whose canonical text is its raw bytes.
    Other,
}

/// One member of a canonical top-level object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    /// The decoded key.
    pub key: Cow<'a, str>,
    /// What the value is.
    pub kind: Kind,
    /// The value's exact bytes (with the quotes, for a string).
    pub raw: &'a str,
    /// Whether a string value holds escapes (so that its text must be decoded).
    escaped: bool,
}

impl Member<'_> {
    /// A string value's decoded text; the raw text for other kinds.
    pub fn text(&self) -> Cow<'_, str> {
        match self.kind {
            Kind::String if !self.escaped => Cow::Borrowed(&self.raw[1..self.raw.len() - 1]),
            Kind::String => Cow::Owned(unescape(&self.raw[1..self.raw.len() - 1])),
            _ => Cow::Borrowed(self.raw),
        }
    }
}

/// The members of a canonical top-level object, in their (sorted) order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Object<'a> {
    /// The members.
    pub members: Vec<Member<'a>>,
}

impl<'a> Object<'a> {
    /// The member named `key`.
    pub fn get(&self, key: &str) -> Option<&Member<'a>> {
        self.members.iter().find(|m| m.key == key)
    }
}

/// Whether `bytes` are one canonical JSON value.
pub fn is_canonical(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    let mut s = Scanner {
        b: text.as_bytes(),
        i: 0,
    };
    s.value(0).is_some() && s.i == s.b.len()
}

/// The members of `bytes` when they are one canonical JSON object; `None` when they are not
/// canonical or not an object.
pub fn object(bytes: &[u8]) -> Option<Object<'_>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut s = Scanner {
        b: text.as_bytes(),
        i: 0,
    };
    let mut members = Vec::with_capacity(12);
    if s.peek()? != b'{' {
        return None;
    }
    s.object(0, Some(&mut members))?;
    if s.i != s.b.len() {
        return None;
    }
    let members = members
        .into_iter()
        .map(|(key, start, kind, escaped)| Member {
            key,
            kind,
            raw: &text[start.0..start.1],
            escaped,
        })
        .collect();
    Some(Object { members })
}

/// A key, the span of its value, the value's kind and whether a string value has escapes.
type Raw<'a> = (Cow<'a, str>, (usize, usize), Kind, bool);

struct Scanner<'a> {
    /// Valid UTF-8 (checked by the callers), so any slice between ASCII delimiters is a `str`.
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// One value; returns its kind and, for a string, whether it has escapes.
    fn value(&mut self, depth: u32) -> Option<(Kind, bool)> {
        match self.peek()? {
            b'{' => self.object(depth, None).map(|()| (Kind::Other, false)),
            b'[' => self.array(depth).map(|()| (Kind::Other, false)),
            b'"' => self.string().map(|escaped| (Kind::String, escaped)),
            b't' => self.literal(b"true").map(|()| (Kind::Other, false)),
            b'f' => self.literal(b"false").map(|()| (Kind::Other, false)),
            b'n' => self.literal(b"null").map(|()| (Kind::Null, false)),
            b'-' | b'0'..=b'9' => self.integer().map(|()| (Kind::Other, false)),
            _ => None,
        }
    }

    fn array(&mut self, depth: u32) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.eat(b'[')?;
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            self.value(depth + 1)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An object whose keys strictly increase; collects the members when asked (top level only).
    fn object(&mut self, depth: u32, mut out: Option<&mut Vec<Raw<'a>>>) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        let mut prev: Option<Cow<'a, str>> = None;
        loop {
            let key = self.key()?;
            if prev
                .as_ref()
                .is_some_and(|p| p.as_bytes() >= key.as_bytes())
            {
                return None;
            }
            self.eat(b':')?;
            let start = self.i;
            let (kind, escaped) = self.value(depth + 1)?;
            if let Some(out) = out.as_deref_mut() {
                out.push((key.clone(), (start, self.i), kind, escaped));
            }
            prev = Some(key);
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn key(&mut self) -> Option<Cow<'a, str>> {
        let start = self.i;
        let escaped = self.string()?;
        // The scanner only ever stops on ASCII bytes, so these are char boundaries of valid UTF-8.
        let inner = std::str::from_utf8(&self.b[start + 1..self.i - 1]).ok()?;
        Some(if escaped {
            Cow::Owned(unescape(inner))
        } else {
            Cow::Borrowed(inner)
        })
    }

    /// A string in serde_json's escaping; returns whether it has escapes.
    fn string(&mut self) -> Option<bool> {
        self.eat(b'"')?;
        let mut escaped = false;
        loop {
            match *self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(escaped);
                }
                b'\\' => {
                    escaped = true;
                    match *self.b.get(self.i + 1)? {
                        b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                        b'u' => {
                            let hex = self.b.get(self.i + 2..self.i + 6)?;
                            // Only control characters without a short form are written as \u00xx,
                            // in lower-case hex.
                            let lower = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
                            if hex[0] != b'0' || hex[1] != b'0' || !matches!(hex[2], b'0' | b'1') {
                                return None;
                            }
                            if !lower(hex[3]) {
                                return None;
                            }
                            let code =
                                u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                            if matches!(code, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d) {
                                return None;
                            }
                            self.i += 6;
                        }
                        _ => return None,
                    }
                }
                // A raw control character is not JSON at all.
                0x00..=0x1f => return None,
                _ => self.i += 1,
            }
        }
    }

    /// An integer that serde_json reads as an i64 or a u64, written as `Number`'s `Display` writes it.
    fn integer(&mut self) -> Option<()> {
        let start = self.i;
        let negative = self.eat(b'-').is_some();
        let digits_start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        let digits = &self.b[digits_start..self.i];
        if digits.is_empty() || (digits[0] == b'0' && digits.len() > 1) {
            return None;
        }
        // A fraction or an exponent makes a float, which has no canonical form.
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        let fits = if negative {
            // serde_json reads "-0" as a float (negative zero).
            digits != b"0" && text.parse::<i64>().is_ok()
        } else {
            text.parse::<u64>().is_ok()
        };
        fits.then_some(())
    }
}

/// Decodes the escapes of a string body already checked by `Scanner::string`.
fn unescape(inner: &str) -> String {
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = u32::from_str_radix(&hex, 16).unwrap_or(0xfffd);
                out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::canonical_json;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// The reference: what the slow path answers.
    fn slow(bytes: &[u8]) -> bool {
        crate::audit::event::is_canonical(bytes)
    }

    #[test]
    fn agrees_with_the_reference_on_chosen_texts() {
        let cases: &[&[u8]] = &[
            br#"{}"#,
            br#"[]"#,
            br#"{"a":1}"#,
            br#"{"a":1,"b":[true,false,null,"x"]}"#,
            br#"{"b":1,"a":2}"#,
            br#"{"a":1,"a":2}"#,
            br#"{"a": 1}"#,
            br#" {"a":1}"#,
            br#"{"a":1} "#,
            br#"{"a":1}x"#,
            br#"{"a":1.0}"#,
            br#"{"a":1e3}"#,
            br#"{"a":-0}"#,
            br#"{"a":0}"#,
            br#"{"a":-1}"#,
            br#"{"a":01}"#,
            br#"{"a":18446744073709551615}"#,
            br#"{"a":18446744073709551616}"#,
            br#"{"a":-9223372036854775808}"#,
            br#"{"a":-9223372036854775809}"#,
            br#"{"a":"\u0041"}"#,
            br#"{"a":"\u001f"}"#,
            br#"{"a":"\u001F"}"#,
            br#"{"a":"\u0008"}"#,
            br#"{"a":"\b\f\n\r\t\"\\"}"#,
            br#"{"a":"\/"}"#,
            br#"{"a":"/"}"#,
            "{\"a\":\"\u{7f}\u{e9}\u{1F600}\"}".as_bytes(),
            b"{\"a\":\"\x01\"}",
            br#"{"a":"\ud83d\ude00"}"#,
            br#"{"\n":1,"a":2}"#,
            br#"{"a":2,"\n":1}"#,
            br#"{"a\u0000":1,"a":2}"#,
            br#"{"a":1,"a\u0000":2}"#,
            br#"{"a":tru}"#,
            br#"{"a":nul}"#,
            br#"{"a":[1,]}"#,
            br#"{"a":[,1]}"#,
            br#"{"a":{"c":1,"b":2}}"#,
            br#"{"a":{"b":2,"c":1}}"#,
            br#"{"a"}"#,
            br#"{"a":}"#,
            br#"{,}"#,
            br#""str""#,
            br#"12"#,
            b"",
            b"\xff",
            b"{\"a\":\"\xc3\"}",
        ];
        for c in cases {
            assert_eq!(is_canonical(c), slow(c), "{:?}", String::from_utf8_lossy(c));
        }
    }

    #[test]
    fn the_nesting_limit_is_serde_jsons() {
        for depth in [100usize, 126, 127, 128, 129, 200] {
            let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            assert_eq!(
                is_canonical(text.as_bytes()),
                slow(text.as_bytes()),
                "{depth}"
            );
            let obj = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
            assert_eq!(
                is_canonical(obj.as_bytes()),
                slow(obj.as_bytes()),
                "{depth}"
            );
        }
    }

    #[test]
    fn members_give_the_decoded_keys_and_values() {
        let bytes = br#"{"a\nb":"x\"y","n":null,"o":{"k":[1]},"s":"plain","z":-3}"#;
        let o = object(bytes).unwrap();
        let keys: Vec<&str> = o.members.iter().map(|m| m.key.as_ref()).collect();
        assert_eq!(keys, ["a\nb", "n", "o", "s", "z"]);
        assert_eq!(o.get("a\nb").unwrap().text(), "x\"y");
        assert_eq!(o.get("n").unwrap().kind, Kind::Null);
        assert_eq!(o.get("o").unwrap().raw, r#"{"k":[1]}"#);
        assert_eq!(o.get("s").unwrap().text(), "plain");
        assert_eq!(o.get("z").unwrap().raw, "-3");
        assert!(object(b"[1]").is_none(), "not an object");
        assert!(object(br#"{"b":1,"a":2}"#).is_none(), "not canonical");
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            "[\\x00-\\x7f\u{e9}\u{1F600}]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[\\x00-\\x7fé]{0,4}", inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_canonical_form_of_any_value_is_accepted(v in arb_json()) {
            let bytes = canonical_json(&v).unwrap();
            prop_assert!(is_canonical(&bytes));
            prop_assert!(slow(&bytes));
        }

        #[test]
        fn any_edit_of_a_canonical_text_is_judged_as_the_reference_judges_it(
            v in arb_json(),
            at in any::<prop::sample::Index>(),
            edit in 0u8..4,
            byte in prop_oneof![Just(b' '), Just(b'"'), Just(b'\\'), Just(b','), Just(b'0'), Just(b'}'), Just(b'u'), any::<u8>()],
        ) {
            let mut bytes = canonical_json(&v).unwrap();
            let i = at.index(bytes.len() + 1);
            match edit {
                0 => bytes.insert(i, byte),
                1 if i < bytes.len() => { bytes.remove(i); }
                2 if i < bytes.len() => bytes[i] = byte,
                _ => bytes.truncate(i),
            }
            prop_assert_eq!(is_canonical(&bytes), slow(&bytes), "{:?}", String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn members_match_the_parsed_value(v in arb_json()) {
            let obj = json!({"data": v, "k": "é\n", "n": null, "x": 1});
            let bytes = canonical_json(&obj).unwrap();
            let o = object(&bytes).unwrap();
            let parsed: Value = serde_json::from_slice(&bytes).unwrap();
            for m in &o.members {
                let want = &parsed[m.key.as_ref()];
                match m.kind {
                    Kind::Null => prop_assert!(want.is_null()),
                    Kind::String => {
                        let text = m.text();
                        prop_assert_eq!(text.as_ref(), want.as_str().unwrap());
                    }
                    Kind::Other => prop_assert_eq!(m.raw, want.to_string()),
                }
            }
            prop_assert_eq!(o.members.len(), parsed.as_object().unwrap().len());
        }
    }
}
