//! API key format, generation and hashing.
//!
//! A key is `zt_<key_id>_<secret>`: `key_id` is 12 base62 characters (public),
//! `secret` 32 base62 characters. The first two characters of `key_id` are the
//! organization's routing slot (0..3844), so every key of an organization
//! lands on the same owner shard as the organization's rate-limit state,
//! whatever the number of shards. Only the Argon2id PHC string of the secret
//! is stored; caches hold an HMAC of it under a per-process random key.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const KEY_ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 32;
/// Number of routing slots (two base62 characters).
pub const SLOTS: u32 = 62 * 62;

/// A parsed key: borrowed from the request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub key_id: &'a str,
    pub secret: &'a str,
}

fn base62_value(b: u8) -> Option<u32> {
    BASE62.iter().position(|&c| c == b).map(|p| p as u32)
}

/// Parses `zt_<key_id>_<secret>`; `None` when malformed.
pub fn parse(key: &str) -> Option<PresentedKey<'_>> {
    let rest = key.strip_prefix("zt_")?;
    if rest.len() != KEY_ID_LEN + 1 + SECRET_LEN || rest.as_bytes()[KEY_ID_LEN] != b'_' {
        return None;
    }
    let (key_id, secret) = (&rest[..KEY_ID_LEN], &rest[KEY_ID_LEN + 1..]);
    let ok = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
    (ok(key_id) && ok(secret)).then_some(PresentedKey { key_id, secret })
}

/// The routing slot of an organization.
pub fn org_slot(org: uuid::Uuid) -> u32 {
    (org.as_u128() % SLOTS as u128) as u32
}

/// The routing slot carried by a key id (its first two characters).
pub fn key_slot(key_id: &str) -> u32 {
    let b = key_id.as_bytes();
    match (
        b.first().and_then(|&c| base62_value(c)),
        b.get(1).and_then(|&c| base62_value(c)),
    ) {
        (Some(hi), Some(lo)) => hi * 62 + lo,
        _ => 0,
    }
}

/// The shard owning a slot.
pub fn owner_shard(slot: u32, shards: usize) -> usize {
    (slot as usize) % shards.max(1)
}

fn random_base62(rng: &mut impl Rng, n: usize) -> String {
    (0..n)
        .map(|_| BASE62[rng.gen_range(0..62)] as char)
        .collect()
}

/// A new key for `org`: (key_id, secret, full key).
pub fn generate(org: uuid::Uuid) -> (String, String, String) {
    let mut rng = rand::thread_rng();
    let slot = org_slot(org);
    let mut key_id = String::with_capacity(KEY_ID_LEN);
    key_id.push(BASE62[(slot / 62) as usize] as char);
    key_id.push(BASE62[(slot % 62) as usize] as char);
    key_id.push_str(&random_base62(&mut rng, KEY_ID_LEN - 2));
    let secret = random_base62(&mut rng, SECRET_LEN);
    let full = format!("zt_{key_id}_{secret}");
    (key_id, secret, full)
}

/// Argon2id parameters (memory in KiB).
#[derive(Debug, Clone, Copy)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

fn argon2(p: HashParams) -> Result<Argon2<'static>, String> {
    let params =
        Params::new(p.memory_kib, p.iterations, p.parallelism, None).map_err(|e| e.to_string())?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// The PHC string of `secret`. CPU-heavy: never call on a shard.
pub fn hash_secret(secret: &str, p: HashParams) -> Result<String, String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2(p)?
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks `secret` against a stored PHC string. CPU-heavy: never call on a shard.
pub fn verify_secret(secret: &str, phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    // Parameters come from the PHC string itself.
    Argon2::default()
        .verify_password(secret.as_bytes(), &hash)
        .is_ok()
}

/// A key id held inline, for the shards' maps: hashing and comparing it
/// touches no heap string (ids are 12 characters; up to 15 fit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId {
    len: u8,
    bytes: [u8; 15],
}

impl KeyId {
    /// `None` for an id longer than 15 bytes (no key has one).
    pub fn new(id: &str) -> Option<KeyId> {
        let src = id.as_bytes();
        let mut bytes = [0u8; 15];
        bytes.get_mut(..src.len())?.copy_from_slice(src);
        Some(KeyId {
            len: src.len() as u8,
            bytes,
        })
    }
}

/// A digest of a stored PHC string: a cache entry remembers which stored hash
/// its secret was verified against, so a re-read of the row can tell whether
/// the verification still holds without running Argon2 again.
pub fn hash_fingerprint(phc: &str) -> [u8; 32] {
    use sha2::Digest;
    Sha256::digest(phc.as_bytes()).into()
}

/// A keyed digest of a secret, for cache comparisons (never the plaintext).
#[derive(Clone)]
pub struct SecretDigester {
    key: [u8; 32],
}

impl SecretDigester {
    pub fn random() -> SecretDigester {
        SecretDigester {
            key: rand::thread_rng().gen(),
        }
    }

    pub fn digest(&self, secret: &str) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_route_with_their_organization() {
        for _ in 0..200 {
            let org = uuid::Uuid::new_v4();
            let (id, secret, full) = generate(org);
            let k = parse(&full).expect("parses");
            assert_eq!((k.key_id, k.secret), (id.as_str(), secret.as_str()));
            assert_eq!(key_slot(&id), org_slot(org));
            for n in 1..5 {
                assert_eq!(owner_shard(key_slot(&id), n), owner_shard(org_slot(org), n));
            }
        }
    }

    #[test]
    fn malformed_keys_are_rejected() {
        let (_, _, full) = generate(uuid::Uuid::new_v4());
        for bad in [
            "",
            "zt_",
            &full[..full.len() - 1],
            &format!("{full}x"),
            &full.replace("zt_", "zz_"),
            &format!("zt_{}-{}", &full[3..15], &full[16..]),
            "zt_ABCDEFGHIJK!_0123456789abcdef0123456789abcdef",
            "zt_ABCDEFGHIJKL_0123456789abcdef0123456789abcdeé",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn argon2id_round_trip_with_small_parameters() {
        let p = HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        };
        let phc = hash_secret("s3cret", p).expect("hash");
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_secret("s3cret", &phc));
        assert!(!verify_secret("s3cret!", &phc));
        assert!(!verify_secret("s3cret", "not a phc string"));
    }

    #[test]
    fn key_ids_held_inline() {
        let id = KeyId::new("AB3kx9Zq01Lm").expect("12 characters fit");
        assert_eq!(Some(id), KeyId::new("AB3kx9Zq01Lm"));
        assert_ne!(Some(id), KeyId::new("AB3kx9Zq01Ln"));
        assert_ne!(KeyId::new("a"), KeyId::new("a\0"));
        assert!(KeyId::new(&"x".repeat(15)).is_some());
        assert!(KeyId::new(&"x".repeat(16)).is_none());
    }

    #[test]
    fn digests_are_keyed() {
        let a = SecretDigester::random();
        let b = SecretDigester::random();
        assert_eq!(a.digest("x"), a.digest("x"));
        assert_ne!(a.digest("x"), a.digest("y"));
        assert_ne!(a.digest("x"), b.digest("x"));
    }
}
