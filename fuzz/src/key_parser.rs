//! The API key parser (`triggers::auth::key`) under arbitrary strings.
//!
//! What must hold: no panic; `parse` accepts exactly the strings of the form
//! `zt_` + 12 ASCII alphanumerics + `_` + 32 ASCII alphanumerics (checked
//! against an independent byte-level oracle); an accepted key's parts are
//! slices of the input and `zt_{id}_{secret}` gives the input back; the slot
//! of any string is below `SLOTS`, and of an accepted key id is the base62
//! value of its first two characters; `owner_shard` is below the shard count;
//! `KeyId::new` holds ids of up to 15 bytes and two ids are equal exactly
//! when their strings are. The same key sent in an `Authorization: Bearer`
//! header through the real decoder is found by `api::bearer`.

use triggers::auth::key::{self, KeyId, KEY_ID_LEN, SECRET_LEN, SLOTS};
use triggers::http::{Decoded, Decoder, InBuf, Limits};

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Runs the property on one fuzz input.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;
    check_parse(s);
    check_slot(s, data);
    // Two strings from one input: the input cut at its first NUL.
    let (a, b) = s.split_once('\0').unwrap_or((s, ""));
    check_key_id(a, b);
    check_parse(a);
    check_bearer(a);
}

fn well_formed(s: &[u8]) -> bool {
    s.len() == 3 + KEY_ID_LEN + 1 + SECRET_LEN
        && s.starts_with(b"zt_")
        && s[3 + KEY_ID_LEN] == b'_'
        && s[3..3 + KEY_ID_LEN].iter().all(u8::is_ascii_alphanumeric)
        && s[4 + KEY_ID_LEN..].iter().all(u8::is_ascii_alphanumeric)
}

fn is_slice_of(part: &str, whole: &str) -> bool {
    let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

fn check_parse(s: &str) {
    let parsed = key::parse(s);
    assert_eq!(parsed.is_some(), well_formed(s.as_bytes()), "{s:?}");
    let Some(k) = parsed else { return };
    assert!(is_slice_of(k.key_id, s) && is_slice_of(k.secret, s));
    assert_eq!(format!("zt_{}_{}", k.key_id, k.secret), s);
    assert_eq!((k.key_id.len(), k.secret.len()), (KEY_ID_LEN, SECRET_LEN));
    let digit = |i: usize| BASE62.iter().position(|&c| c == k.key_id.as_bytes()[i]);
    let want = digit(0).zip(digit(1)).map(|(hi, lo)| (hi * 62 + lo) as u32);
    assert_eq!(Some(key::key_slot(k.key_id)), want);
    assert!(KeyId::new(k.key_id).is_some());
}

fn check_slot(s: &str, data: &[u8]) {
    let slot = key::key_slot(s);
    assert!(slot < SLOTS, "slot {slot} of {s:?}");
    let shards = data.first().map_or(0, |&b| b as usize);
    let owner = key::owner_shard(slot, shards);
    assert!(owner < shards.max(1), "owner {owner} of {shards} shards");
    let raw = data
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    assert!(key::owner_shard(raw, shards) < shards.max(1));
}

fn check_key_id(a: &str, b: &str) {
    let (ia, ib) = (KeyId::new(a), KeyId::new(b));
    assert_eq!(ia.is_some(), a.len() <= 15, "{a:?}");
    assert_eq!(ib.is_some(), b.len() <= 15, "{b:?}");
    if let (Some(x), Some(y)) = (ia, ib) {
        assert_eq!(x == y, a == b, "{a:?} vs {b:?}");
    }
    assert_eq!(ia, KeyId::new(a));
}

/// The header path: a value the decoder accepts reaches `api::bearer`
/// trimmed, and a well-formed key there parses to the same parts.
fn check_bearer(s: &str) {
    if s.bytes().any(|b| b == b'\r' || b == b'\n') {
        return;
    }
    let head = format!("GET / HTTP/1.1\r\nAuthorization: Bearer {s}\r\n\r\n");
    let mut decoder = Decoder::new(Limits {
        max_header_bytes: 16 * 1024,
    });
    let mut buf = InBuf::with_capacity(head.len());
    buf.extend(head.as_bytes());
    let Ok(Decoded::Request(req)) = decoder.decode(&mut buf, &|_, _| 0) else {
        return;
    };
    let Some(token) = triggers::api::bearer(&req) else {
        return;
    };
    assert!(s.contains(token), "{token:?} not in {s:?}");
    if well_formed(s.as_bytes()) {
        assert_eq!(key::parse(token), key::parse(s));
    }
}
