//! Postgres stores no NUL character in `text` or `jsonb` (a `\u0000` escape is refused): what a
//! job produced — a program's output, a model's reply, an error message — has each NUL replaced
//! by U+FFFD before it is stored (and before its terminal event, so both say the same).

use serde_json::Value;

/// What a NUL becomes.
pub const REPLACEMENT: &str = "\u{FFFD}";

/// Replaces each NUL of `s`; whether there was one.
pub fn clean_str(s: &mut String) -> bool {
    if s.contains('\0') {
        *s = s.replace('\0', REPLACEMENT);
        true
    } else {
        false
    }
}

/// Replaces each NUL in the strings and keys of `v`; whether there was one.
pub fn clean_json(v: &mut Value) -> bool {
    match v {
        Value::String(s) => clean_str(s),
        Value::Array(items) => items.iter_mut().fold(false, |any, x| clean_json(x) | any),
        Value::Object(map) if map.keys().any(|k| k.contains('\0')) => {
            let old = std::mem::take(map);
            for (mut k, mut x) in old {
                clean_str(&mut k);
                clean_json(&mut x);
                map.insert(k, x);
            }
            true
        }
        Value::Object(map) => map.values_mut().fold(false, |any, x| clean_json(x) | any),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_characters_become_replacement_characters_everywhere() {
        let mut v = json!({"a\u{0}b": ["x\u{0}", 1, {"k": "\u{0}\u{0}"}], "clean": "yes"});
        assert!(clean_json(&mut v));
        assert_eq!(
            v,
            json!({"a\u{FFFD}b": ["x\u{FFFD}", 1, {"k": "\u{FFFD}\u{FFFD}"}], "clean": "yes"})
        );
        let mut clean = json!({"a": ["b", null, 2.5]});
        assert!(!clean_json(&mut clean));
        assert_eq!(clean, json!({"a": ["b", null, 2.5]}));
    }
}
