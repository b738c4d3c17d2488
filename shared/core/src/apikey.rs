//! API keys: `sy_`-prefixed high-entropy secrets, stored only as SHA-256 digests.

use rand::Rng;
use sha2::{Digest, Sha256};

/// Every key starts with this, so keys and JWTs can share `Authorization: Bearer`.
pub const KEY_PREFIX: &str = "sy_";
const ID_LEN: usize = 8;
/// Length of the visible part (`sy_` + 8), the most of a key that may be logged.
pub const PREFIX_LEN: usize = KEY_PREFIX.len() + ID_LEN;
const SECRET_LEN: usize = 40;
const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A freshly generated key: `full` is shown once, `prefix` is the visible, non-secret part.
#[derive(Clone)]
pub struct GeneratedKey {
    pub full: String,
    pub prefix: String,
    pub digest: [u8; 32],
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("prefix", &self.prefix)
            .field("full", &"[redacted]")
            .finish()
    }
}

fn random_string(len: usize) -> String {
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A random secret of `len` alphanumeric characters (about 5.95 bits each, from the OS RNG),
/// e.g. a tenant's HS256 signing secret.
pub fn random_secret(len: usize) -> String {
    random_string(len)
}

/// Generates `sy_<8 visible>_<40 secret>` (about 238 bits of entropy from the OS RNG).
pub fn generate() -> GeneratedKey {
    let full = format!(
        "{KEY_PREFIX}{}_{}",
        random_string(ID_LEN),
        random_string(SECRET_LEN)
    );
    from_full(&full).expect("generated key is well formed")
}

/// Checks the shape of a presented key and computes its digest; `None` if malformed.
pub fn from_full(full: &str) -> Option<GeneratedKey> {
    let rest = full.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok(id, ID_LEN) || !ok(secret, SECRET_LEN) {
        return None;
    }
    Some(GeneratedKey {
        full: full.to_string(),
        prefix: format!("{KEY_PREFIX}{id}"),
        digest: digest(full),
    })
}

pub fn digest(full: &str) -> [u8; 32] {
    Sha256::digest(full.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a.full, b.full);
        assert!(a.full.starts_with("sy_"));
        let parsed = from_full(&a.full).unwrap();
        assert_eq!(parsed.digest, a.digest);
        assert_eq!(parsed.prefix.len(), 11);
        assert!(!format!("{a:?}").contains(&a.full));
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for k in ["", "sy_", "sk_abc", "sy_short_x", "eyJhbGciOi.jwt.token"] {
            assert!(from_full(k).is_none(), "{k}");
        }
    }
}
