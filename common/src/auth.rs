//! Request signing: a narrow profile of RFC 9421 (HTTP Message Signatures) with ed25519.
//!
//! Every call carries two headers:
//!
//! ```text
//! Signature-Input: ptth=("@method" "@authority" "@path");created=1700000000;expires=1700000060;nonce="...";keyid="...";alg="ed25519";tag="ptth-v1"
//! Signature: ptth=:<base64 ed25519 signature>:
//! ```
//!
//! `keyid` is the standard base64 of the caller's public key; `nonce` is 16 random bytes in
//! base64. The signature base is built as in RFC 9421 section 2.5, so ordinary RFC 9421
//! libraries can produce it. Bodies are not covered (they stream); TLS protects them.
//!
//! The [`Verifier`] checks, cheapest first: header shape and sizes, the time window, the key,
//! the signature (`verify_strict`), and only then records the nonce in a bounded cache.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer as _};
use parking_lot::{Mutex, RwLock};

use crate::keys::{PrivateKey, PublicKey};

/// Header holding the signature parameters.
pub const SIGNATURE_INPUT: &str = "signature-input";
/// Header holding the signature.
pub const SIGNATURE: &str = "signature";
/// Header naming the authority a request was signed for (the `@authority` of its signature
/// base), so that a relay that sees the request under another authority can tell why its
/// signature fails.
pub const SIGNED_AUTHORITY: &str = "ptth-signed-authority";
/// Header on a relay's `401` naming the authority it checked the signature against when that
/// is the request's own (`Host` or `:authority`, lowercased; `authorities` unset), so that
/// a caller whose `Host` a front changed can tell.
pub const RELAY_AUTHORITY: &str = "ptth-relay-authority";
/// The one-line reasons (the body) of a relay's `401` answers, which the endpoints read to say
/// what to do.
pub mod reason {
    /// Headers missing, oversized or not of this profile.
    pub const MALFORMED: &str = "missing or malformed signature";
    /// Unknown key, a signature that does not verify, or one over another authority: one
    /// answer, so that a caller cannot tell which keys are configured.
    pub const INVALID: &str = "invalid signature";
    /// Outside the time window.
    pub const STALE: &str = "signature expired or not yet valid: check the clocks";
    /// The nonce was used before.
    pub const REPLAYED: &str = "replayed request";
}
/// The signature label used in both headers.
pub const LABEL: &str = "ptth";
/// The application tag that scopes signatures to this protocol.
pub const TAG: &str = "ptth-v1";
/// Covered components, exactly as serialized.
const COMPONENTS: &str = r#"("@method" "@authority" "@path")"#;
/// Longest validity a signature may claim, and the longest age accepted.
pub const MAX_AGE_SECS: u64 = 60;
/// Allowed clock skew for signatures created in the future: a caller's clock may be this far
/// ahead of the relay's (and, since a signature is valid [`MAX_AGE_SECS`], nearly as far
/// behind).
pub const MAX_SKEW_SECS: u64 = 45;
/// Longest `Signature-Input` header accepted.
const MAX_INPUT_LEN: usize = 512;
/// Longest `Signature` header accepted.
const MAX_SIGNATURE_LEN: usize = 128;
/// Nonce length in bytes.
const NONCE_LEN: usize = 16;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The header values of a signed request.
#[derive(Debug, Clone)]
pub struct SignedHeaders {
    /// Value of `Signature-Input`.
    pub input: String,
    /// Value of `Signature`.
    pub signature: String,
    /// The authority signed for, sent as [`SIGNED_AUTHORITY`] so that a relay that sees
    /// another one can say so.
    pub authority: String,
}

impl SignedHeaders {
    /// These headers as a relay receives them.
    pub fn as_received(&self) -> ReceivedHeaders<'_> {
        ReceivedHeaders {
            input: Some(&self.input),
            signature: Some(&self.signature),
            signed_for: Some(&self.authority),
        }
    }
}

/// The signature headers of a request as received (each `None` when absent or not text).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReceivedHeaders<'a> {
    /// Value of `Signature-Input`.
    pub input: Option<&'a str>,
    /// Value of `Signature`.
    pub signature: Option<&'a str>,
    /// Value of [`SIGNED_AUTHORITY`]: the authority the caller says it signed for. Not
    /// covered by the signature, and never trusted: a relay tries it only to explain a
    /// signature that failed.
    pub signed_for: Option<&'a str>,
}

/// Signs requests with one private key.
#[derive(Debug, Clone)]
pub struct Signer {
    key: PrivateKey,
    keyid: String,
}

impl Signer {
    /// A signer for `key`.
    pub fn new(key: PrivateKey) -> Self {
        let keyid = key.public().to_base64();
        Self { key, keyid }
    }

    /// The `keyid` it signs with: the standard base64 of its public key, as in `relay.toml`.
    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// Signs `method authority path`, created now.
    pub fn sign(&self, method: &str, authority: &str, path: &str) -> SignedHeaders {
        let mut nonce = [0u8; NONCE_LEN];
        // The OS random source does not fail on supported platforms; a zero nonce would only
        // make the relay refuse the request as a replay, never accept a forged one.
        if let Err(e) = getrandom::fill(&mut nonce) {
            tracing::error!(error = %e, "random source failed");
        }
        self.sign_with(method, authority, path, unix_now(), &nonce)
    }

    /// Signs with explicit time and nonce (for tests and other implementations).
    pub fn sign_with(
        &self,
        method: &str,
        authority: &str,
        path: &str,
        created: u64,
        nonce: &[u8],
    ) -> SignedHeaders {
        let params = format!(
            "{COMPONENTS};created={created};expires={};nonce=\"{}\";keyid=\"{}\";alg=\"ed25519\";tag=\"{TAG}\"",
            created + MAX_AGE_SECS,
            STANDARD.encode(nonce),
            self.keyid
        );
        let base = signature_base(method, authority, path, &params);
        let sig = self.key.signing_key().sign(base.as_bytes());
        SignedHeaders {
            input: format!("{LABEL}={params}"),
            signature: format!("{LABEL}=:{}:", STANDARD.encode(sig.to_bytes())),
            authority: authority.to_owned(),
        }
    }
}

fn signature_base(method: &str, authority: &str, path: &str, params: &str) -> String {
    format!(
        "\"@method\": {method}\n\"@authority\": {authority}\n\"@path\": {path}\n\"@signature-params\": {params}"
    )
}

/// Why a request was not authenticated. The relay answers [`AuthError::UnknownKey`],
/// [`AuthError::BadSignature`] and [`AuthError::OtherAuthority`] alike, so that a caller cannot
/// tell which keys are configured; they differ for the relay's own log.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// Headers missing, oversized or not of this profile.
    #[error("missing or malformed signature headers: {0}")]
    Malformed(&'static str),
    /// The `keyid` names no configured key (`None`: it is not base64 of 32 bytes).
    #[error("unknown key {}", key_text(.0.as_ref()))]
    UnknownKey(Option<[u8; 32]>),
    /// The signature of a configured key (its `keyid`) verifies over none of the authorities
    /// checked, nor over the one the caller says it signed for.
    #[error("the signature by key {} does not verify", key_text(Some(.0)))]
    BadSignature([u8; 32]),
    /// The signature of a configured key (its `keyid`) verifies over the authority the caller
    /// says it signed for, which is none of those checked.
    #[error("the signature by key {} is for another authority", key_text(Some(.0)))]
    OtherAuthority([u8; 32]),
    /// Outside the accepted time window: `created` minus the relay's clock, in seconds
    /// (positive when the signer's clock is ahead).
    #[error("{}", stale_text(*.0))]
    Stale(i64),
    /// The nonce was used before.
    #[error("replayed request")]
    Replay,
    /// The nonce cache is full; refuse rather than forget live nonces.
    #[error("too many requests in flight, retry shortly")]
    Busy,
}

impl AuthError {
    /// A short name of the cause, for the relay's metrics and audit log (which only its
    /// operator sees): `malformed`, `unknown_key`, `bad_signature`, `other_authority`,
    /// `stale`, `replay` or `busy`.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature(_) => "bad_signature",
            Self::OtherAuthority(_) => "other_authority",
            Self::Stale(_) => "stale",
            Self::Replay => "replay",
            Self::Busy => "busy",
        }
    }
}

/// A `keyid` for the relay's log: the key's base64 (as in `relay.toml`).
fn key_text(keyid: Option<&[u8; 32]>) -> String {
    keyid.map_or_else(
        || "(keyid is not base64 of 32 bytes)".to_owned(),
        |k| STANDARD.encode(k),
    )
}

/// A stale signature for the relay's log: which way and how far `created` is off. (One
/// created ahead of the relay's clock is refused only beyond the allowance; one expires only
/// after it was created.)
fn stale_text(created_minus_now: i64) -> String {
    let by = created_minus_now.unsigned_abs();
    if created_minus_now > 0 {
        format!("signed {by} s ahead of the relay's clock (at most {MAX_SKEW_SECS} s allowed)")
    } else {
        format!(
            "signed {by} s before the relay's clock, and expired (valid at most {MAX_AGE_SECS} s)"
        )
    }
}

struct Parsed<'a> {
    params: &'a str,
    created: u64,
    expires: u64,
    nonce: [u8; NONCE_LEN],
    keyid: [u8; 32],
    signature: Signature,
}

fn parse<'a>(input: &'a str, signature: &str) -> Result<Parsed<'a>, AuthError> {
    use AuthError::Malformed;
    if input.len() > MAX_INPUT_LEN || signature.len() > MAX_SIGNATURE_LEN {
        return Err(Malformed("header too long"));
    }
    let params = input
        .strip_prefix(LABEL)
        .and_then(|s| s.strip_prefix('='))
        .ok_or(Malformed("signature-input label"))?;
    let rest = params
        .strip_prefix(COMPONENTS)
        .ok_or(Malformed("covered components"))?;
    let (mut created, mut expires, mut nonce, mut keyid, mut alg, mut tag) =
        (None, None, None, None, None, None);
    for item in rest.split(';').skip(1) {
        let (name, value) = item.split_once('=').ok_or(Malformed("parameter"))?;
        let slot = match name {
            "created" => &mut created,
            "expires" => &mut expires,
            "nonce" => &mut nonce,
            "keyid" => &mut keyid,
            "alg" => &mut alg,
            "tag" => &mut tag,
            _ => return Err(Malformed("unknown parameter")),
        };
        if slot.replace(value).is_some() {
            return Err(Malformed("duplicate parameter"));
        }
    }
    if !rest.starts_with(';') {
        return Err(Malformed("parameters"));
    }
    let int = |v: Option<&str>| -> Result<u64, AuthError> {
        let v = v.ok_or(Malformed("created/expires missing"))?;
        if v.is_empty() || v.len() > 15 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Malformed("created/expires"));
        }
        v.parse().map_err(|_| Malformed("created/expires"))
    };
    let string = |v: Option<&'a str>, what: &'static str| -> Result<&'a str, AuthError> {
        let v = v.ok_or(Malformed(what))?;
        let inner = v
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .ok_or(Malformed(what))?;
        if inner.bytes().any(|b| b == b'"' || b == b'\\') {
            return Err(Malformed(what));
        }
        Ok(inner)
    };
    if string(alg, "alg")? != "ed25519" {
        return Err(Malformed("alg"));
    }
    if string(tag, "tag")? != TAG {
        return Err(Malformed("tag"));
    }
    let mut nonce_bytes = [0u8; NONCE_LEN];
    match STANDARD.decode_slice(string(nonce, "nonce")?, &mut nonce_bytes) {
        Ok(NONCE_LEN) => {}
        _ => return Err(Malformed("nonce")),
    }
    let mut keyid_bytes = [0u8; 32];
    match STANDARD.decode_slice(string(keyid, "keyid")?, &mut keyid_bytes) {
        Ok(32) => {}
        _ => return Err(AuthError::UnknownKey(None)),
    }
    let sig_b64 = signature
        .strip_prefix(LABEL)
        .and_then(|s| s.strip_prefix("=:"))
        .and_then(|s| s.strip_suffix(':'))
        .ok_or(Malformed("signature"))?;
    let mut sig = [0u8; 64];
    match STANDARD.decode_slice(sig_b64, &mut sig) {
        Ok(64) => {}
        _ => return Err(Malformed("signature")),
    }
    Ok(Parsed {
        params,
        created: int(created)?,
        expires: int(expires)?,
        nonce: nonce_bytes,
        keyid: keyid_bytes,
        signature: Signature::from_bytes(&sig),
    })
}

/// Bounded cache of (key, nonce) pairs seen within the validity window, shared fairly: half
/// of it is reserved, in equal parts, for each key, and the other half is a pool from which
/// one key may take at most a quarter. A few keys that sign as fast as they can therefore
/// exhaust the pool but never another key's reserve. Live entries are never evicted: a key
/// with no room left gets [`AuthError::Busy`].
#[derive(Debug)]
struct NonceCache {
    seen: HashMap<(usize, [u8; NONCE_LEN]), u64>,
    order: VecDeque<(u64, usize, [u8; NONCE_LEN])>,
    /// Live nonces per key.
    per_key: HashMap<usize, usize>,
    /// Entries each key may hold whatever the others do.
    reserve: usize,
    /// Entries of the pool, and how many are taken (a key's entries beyond its reserve).
    pool: usize,
    pooled: usize,
    /// Most entries of the pool one key may take.
    pool_per_key: usize,
    /// Most entries in all.
    capacity: usize,
}

impl NonceCache {
    /// A cache of at most `capacity` entries for `keys` keys (indices `0..keys`).
    fn new(capacity: usize, keys: usize) -> Self {
        let mut cache = Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            per_key: HashMap::new(),
            reserve: 0,
            pool: 0,
            pooled: 0,
            pool_per_key: 0,
            capacity,
        };
        cache.share_between(&(0..keys).collect::<Vec<_>>());
        cache
    }

    /// Shares the cache between the keys of indices `live` from now on: the entries it holds
    /// stay, each counted against its key's new share (a key over it waits for its entries to
    /// expire). A removed key's entries keep a share until they expire, so that the cache
    /// never holds more than its capacity.
    fn share_between(&mut self, live: &[usize]) {
        let live_set: std::collections::HashSet<usize> = live.iter().copied().collect();
        let removed_with_entries = self
            .per_key
            .keys()
            .filter(|k| !live_set.contains(k))
            .count();
        let keys = live.len() + removed_with_entries;
        self.reserve = self.capacity / 2 / keys.max(1);
        self.pool = self.capacity - self.reserve * keys.max(1);
        self.pool_per_key = (self.pool / 4).max(1);
        self.pooled = self
            .per_key
            .values()
            .map(|n| n.saturating_sub(self.reserve))
            .sum();
    }

    /// Records a nonce until `keep_until`. Entries are kept for the same span from insertion
    /// (the longest a signature can still be accepted), so the FIFO is also in expiry order.
    fn insert(
        &mut self,
        now: u64,
        who: usize,
        nonce: [u8; NONCE_LEN],
        keep_until: u64,
    ) -> Result<(), AuthError> {
        while let Some(&(until, w, n)) = self.order.front() {
            if until >= now {
                break;
            }
            self.order.pop_front();
            if self.seen.remove(&(w, n)).is_some()
                && let Some(c) = self.per_key.get_mut(&w)
            {
                if *c > self.reserve {
                    self.pooled = self.pooled.saturating_sub(1);
                }
                *c -= 1;
                if *c == 0 {
                    self.per_key.remove(&w);
                }
            }
        }
        if self.seen.contains_key(&(who, nonce)) {
            return Err(AuthError::Replay);
        }
        let mine = self.per_key.get(&who).copied().unwrap_or(0);
        if mine >= self.reserve {
            if self.pooled >= self.pool || mine - self.reserve >= self.pool_per_key {
                return Err(AuthError::Busy);
            }
            self.pooled += 1;
        }
        *self.per_key.entry(who).or_insert(0) += 1;
        self.seen.insert((who, nonce), keep_until);
        self.order.push_back((keep_until, who, nonce));
        Ok(())
    }
}

/// Verifies signed requests against a set of public keys, each mapped to a principal; the set
/// is replaced whole on a configuration reload ([`Verifier::replace_keys`]).
#[derive(Debug)]
pub struct Verifier<P> {
    keys: RwLock<KeySet<P>>,
    nonces: Mutex<NonceCache>,
}

/// The keys a [`Verifier`] knows.
#[derive(Debug)]
struct KeySet<P> {
    /// By the key's 32 bytes (the `keyid`): its index in the nonce cache, the key decoded
    /// once for all, and its principal. Shared with the verifications in progress, so that
    /// the lock is held only to take it.
    by_id: Arc<HashMap<[u8; 32], (usize, PublicKey, P)>>,
    /// The index of every key known since start: a key keeps its index when the set is
    /// replaced, even when it comes back after a removal, and with it its nonces. (Bounded by
    /// the keys ever configured.)
    indices: HashMap<[u8; 32], usize>,
}

impl<P: Clone> Verifier<P> {
    /// A verifier for `keys`, remembering at most `nonce_capacity` nonces.
    pub fn new(keys: impl IntoIterator<Item = (PublicKey, P)>, nonce_capacity: usize) -> Self {
        let by_id: HashMap<_, _> = keys
            .into_iter()
            .enumerate()
            .map(|(i, (k, p))| (k.to_bytes(), (i, k, p)))
            .collect();
        let nonces = Mutex::new(NonceCache::new(nonce_capacity, by_id.len()));
        Self {
            keys: RwLock::new(KeySet {
                indices: by_id.iter().map(|(id, (i, _, _))| (*id, *i)).collect(),
                by_id: Arc::new(by_id),
            }),
            nonces,
        }
    }

    /// Replaces the keys (a configuration reload): requests signed by a key no longer among
    /// them are refused from now on. The nonces seen so far stay remembered (a request seen
    /// before the reload is still a replay after it), each key's under its own share.
    pub fn replace_keys(&self, keys: impl IntoIterator<Item = (PublicKey, P)>) {
        let mut set = self.keys.write();
        let mut by_id = HashMap::new();
        for (k, p) in keys {
            let next = set.indices.len();
            let index = *set.indices.entry(k.to_bytes()).or_insert(next);
            by_id.insert(k.to_bytes(), (index, k, p));
        }
        let live: Vec<usize> = by_id.values().map(|(i, _, _)| *i).collect();
        set.by_id = Arc::new(by_id);
        drop(set);
        self.nonces.lock().share_between(&live);
    }

    /// Verifies a request signed over any one of `authorities` (the names the relay answers
    /// to: its configured public names, or the request's own `Host`). `now` is seconds since
    /// the epoch. The authority the caller says it signed for is never accepted: it is tried
    /// only once the signature has failed, to tell [`AuthError::OtherAuthority`] from
    /// [`AuthError::BadSignature`]. Returns the principal of the key that signed it.
    pub fn verify(
        &self,
        method: &str,
        authorities: &[&str],
        path: &str,
        received: ReceivedHeaders<'_>,
        now: u64,
    ) -> Result<P, AuthError> {
        let input = received
            .input
            .ok_or(AuthError::Malformed("signature-input missing"))?;
        let signature = received
            .signature
            .ok_or(AuthError::Malformed("signature missing"))?;
        let p = parse(input, signature)?;
        if p.expires <= p.created || p.expires - p.created > MAX_AGE_SECS {
            return Err(AuthError::Malformed("expires"));
        }
        if p.created > now + MAX_SKEW_SECS || now > p.expires {
            // Both at most 15 digits: no overflow.
            return Err(AuthError::Stale(p.created as i64 - now as i64));
        }
        let keys = self.keys.read().by_id.clone();
        let (who, key, principal) = keys
            .get(&p.keyid)
            .ok_or(AuthError::UnknownKey(Some(p.keyid)))?;
        let verifies = |authority: &str| {
            let base = signature_base(method, authority, path, p.params);
            key.verifying_key()
                .verify_strict(base.as_bytes(), &p.signature)
                .is_ok()
        };
        if !authorities.iter().any(|a| verifies(a)) {
            return Err(match received.signed_for {
                Some(other) if !authorities.contains(&other) && verifies(other) => {
                    AuthError::OtherAuthority(p.keyid)
                }
                _ => AuthError::BadSignature(p.keyid),
            });
        }
        // A signature is accepted until min(expires, created + 60 s), and created is at most
        // now + skew: keeping every nonce for max age + skew from now covers that, and keeps
        // the cache's queue in expiry order.
        let keep_until = now + MAX_AGE_SECS + MAX_SKEW_SECS;
        self.nonces.lock().insert(now, *who, p.nonce, keep_until)?;
        Ok(principal.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(cap: usize) -> (Signer, Verifier<&'static str>) {
        let key = PrivateKey::generate().expect("gen");
        let v = Verifier::new([(key.public(), "alice")], cap);
        (Signer::new(key), v)
    }

    const A: &str = "relay.example:4000";
    const P: &str = "/v1/servers/db/ports/pg/connect";

    fn check(
        v: &Verifier<&'static str>,
        h: &SignedHeaders,
        path: &str,
        now: u64,
    ) -> Result<&'static str, AuthError> {
        v.verify("POST", &[A], path, h.as_received(), now)
    }

    #[test]
    fn accepts_once_then_refuses_replay() {
        let (s, v) = setup(10);
        let h = s.sign("POST", A, P);
        assert_eq!(check(&v, &h, P, unix_now()), Ok("alice"));
        assert_eq!(check(&v, &h, P, unix_now()), Err(AuthError::Replay));
    }

    #[test]
    fn replaced_keys_keep_the_nonces_seen_and_refuse_removed_keys() {
        let alice = PrivateKey::generate().expect("gen");
        let bob = PrivateKey::generate().expect("gen");
        let v = Verifier::new([(alice.public(), "alice")], 10);
        let (alice, bob) = (Signer::new(alice), Signer::new(bob));
        let seen = alice.sign("POST", A, P);
        assert_eq!(check(&v, &seen, P, unix_now()), Ok("alice"));
        v.replace_keys([(alice.key.public(), "alice"), (bob.key.public(), "bob")]);
        assert_eq!(
            check(&v, &seen, P, unix_now()),
            Err(AuthError::Replay),
            "a request seen before the reload is a replay after it"
        );
        assert_eq!(check(&v, &bob.sign("POST", A, P), P, unix_now()), Ok("bob"));
        v.replace_keys([(bob.key.public(), "bob")]);
        assert_eq!(
            check(&v, &alice.sign("POST", A, P), P, unix_now()),
            Err(AuthError::UnknownKey(Some(keyid(&alice))))
        );
        assert_eq!(check(&v, &bob.sign("POST", A, P), P, unix_now()), Ok("bob"));
        // Back again: what alice signed before is still a replay.
        v.replace_keys([(alice.key.public(), "alice"), (bob.key.public(), "bob")]);
        assert_eq!(check(&v, &seen, P, unix_now()), Err(AuthError::Replay));
    }

    /// The `keyid` of `signer`'s key.
    fn keyid(signer: &Signer) -> [u8; 32] {
        signer.key.public().to_bytes()
    }

    #[test]
    fn refuses_tampering_and_unknown_keys() {
        let (s, v) = setup(10);
        let h = s.sign("POST", A, P);
        let now = unix_now();
        assert_eq!(
            check(&v, &h, "/v1/servers/web/ports/pg/connect", now),
            Err(AuthError::BadSignature(keyid(&s)))
        );
        let other = Signer::new(PrivateKey::generate().expect("gen"));
        assert_eq!(
            check(&v, &other.sign("POST", A, P), P, now),
            Err(AuthError::UnknownKey(Some(keyid(&other))))
        );
        let mut bad = h.clone();
        bad.input = bad.input.replace("created=", "created=1");
        assert!(check(&v, &bad, P, now).is_err());
        let short_keyid = h.input.replace(&s.keyid, "AAAA");
        let received = ReceivedHeaders {
            input: Some(&short_keyid),
            ..h.as_received()
        };
        assert_eq!(
            v.verify("POST", &[A], P, received, now),
            Err(AuthError::UnknownKey(None))
        );
    }

    /// A signature over another authority than those checked is told apart when the caller
    /// names the authority it signed for, and only if the signature verifies over it.
    #[test]
    fn another_authority_is_told_apart_only_when_it_verifies() {
        let (s, v) = setup(10);
        let h = s.sign("POST", A, P);
        let now = unix_now();
        let at_other = |received| v.verify("POST", &["other:4000"], P, received, now);
        assert_eq!(
            at_other(h.as_received()),
            Err(AuthError::OtherAuthority(keyid(&s)))
        );
        let unnamed = ReceivedHeaders {
            signed_for: None,
            ..h.as_received()
        };
        assert_eq!(at_other(unnamed), Err(AuthError::BadSignature(keyid(&s))));
        let misnamed = ReceivedHeaders {
            signed_for: Some("third:4000"),
            ..h.as_received()
        };
        assert_eq!(at_other(misnamed), Err(AuthError::BadSignature(keyid(&s))));
        // Naming an authority is never enough to be accepted there.
        let named_other = ReceivedHeaders {
            signed_for: Some("other:4000"),
            ..h.as_received()
        };
        assert_eq!(
            at_other(named_other),
            Err(AuthError::BadSignature(keyid(&s)))
        );
        assert_eq!(check(&v, &h, P, now), Ok("alice"));
    }

    #[test]
    fn every_signed_parameter_is_covered() {
        let (s, v) = setup(10);
        let now = unix_now();
        let h = s.sign_with("POST", A, P, now - 5, &[4; 16]);
        let tampered = [
            // Still inside the time window, so only the signature can catch them.
            h.input.replace(
                &format!("created={}", now - 5),
                &format!("created={}", now - 4),
            ),
            h.input.replace(
                &format!("expires={}", now + 55),
                &format!("expires={}", now + 54),
            ),
            h.input
                .replace(&STANDARD.encode([4u8; 16]), &STANDARD.encode([5u8; 16])),
        ];
        for input in tampered {
            assert_ne!(input, h.input, "the replacement must change something");
            let received = ReceivedHeaders {
                input: Some(&input),
                ..h.as_received()
            };
            assert_eq!(
                v.verify("POST", &[A], P, received, now),
                Err(AuthError::BadSignature(keyid(&s))),
                "{input}"
            );
        }
        assert_eq!(
            v.verify("GET", &[A], P, h.as_received(), now),
            Err(AuthError::BadSignature(keyid(&s))),
            "method"
        );
        // Unchanged, the same request passes (once).
        assert_eq!(check(&v, &h, P, now), Ok("alice"));
    }

    /// Only a caller of another profile does that: not a matter of clocks.
    #[test]
    fn a_longer_validity_than_sixty_seconds_is_malformed() {
        let (s, v) = setup(10);
        let now = unix_now();
        let h = s.sign_with("POST", A, P, now, &[6; 16]);
        let mut long = h.clone();
        long.input = h.input.replace(
            &format!("expires={}", now + MAX_AGE_SECS),
            &format!("expires={}", now + 3600),
        );
        assert_eq!(
            check(&v, &long, P, now),
            Err(AuthError::Malformed("expires"))
        );
    }

    /// The worked example of docs/protocol.md, byte for byte.
    #[test]
    fn documented_example_is_reproduced() {
        let seed: [u8; 32] = [
            0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec,
            0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03,
            0x1c, 0xae, 0x7f, 0x60,
        ];
        let key = PrivateKey::from_seed(&seed);
        let nonce: Vec<u8> = (0..16).collect();
        let path = "/v1/servers/db/ports/postgres/connect";
        let h = Signer::new(key.clone()).sign_with(
            "POST",
            "relay.example.com",
            path,
            1_700_000_000,
            &nonce,
        );
        assert_eq!(
            h.input,
            r#"ptth=("@method" "@authority" "@path");created=1700000000;expires=1700000060;nonce="AAECAwQFBgcICQoLDA0ODw==";keyid="11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";alg="ed25519";tag="ptth-v1""#
        );
        assert_eq!(
            h.signature,
            "ptth=:vxMFn3YI5l36yhAJ6auboUNMzJAns5azOHVY8gU1OYJxke47NT+QMm2LJWgwyBCabfm6VRX+wyhfAGr7vP69Bw==:"
        );
        let v = Verifier::new([(key.public(), "example")], 10);
        let at = |now| v.verify("POST", &["relay.example.com"], path, h.as_received(), now);
        assert_eq!(at(1_699_999_954), Err(AuthError::Stale(46)));
        assert_eq!(at(1_700_000_061), Err(AuthError::Stale(-61)));
        assert_eq!(at(1_699_999_955), Ok("example"));
        assert_eq!(at(1_700_000_060), Err(AuthError::Replay));
    }

    #[test]
    fn refuses_old_and_future_signatures() {
        let (s, v) = setup(10);
        let now = unix_now();
        let old = s.sign_with("POST", A, P, now - MAX_AGE_SECS - 1, &[1; 16]);
        assert_eq!(check(&v, &old, P, now), Err(AuthError::Stale(-61)));
        let future = s.sign_with("POST", A, P, now + MAX_SKEW_SECS + 5, &[2; 16]);
        assert_eq!(check(&v, &future, P, now), Err(AuthError::Stale(50)));
        assert_eq!(
            AuthError::Stale(50).to_string(),
            "signed 50 s ahead of the relay's clock (at most 45 s allowed)"
        );
        assert_eq!(
            AuthError::Stale(-61).to_string(),
            "signed 61 s before the relay's clock, and expired (valid at most 60 s)"
        );
        let edge = s.sign_with("POST", A, P, now - MAX_AGE_SECS + 1, &[3; 16]);
        assert_eq!(check(&v, &edge, P, now), Ok("alice"));
    }

    #[test]
    fn one_key_cannot_fill_the_nonce_cache() {
        let alice = PrivateKey::generate().expect("gen");
        let bob = PrivateKey::generate().expect("gen");
        let v = Verifier::new([(alice.public(), "alice"), (bob.public(), "bob")], 8);
        let (a, b) = (Signer::new(alice), Signer::new(bob));
        let now = unix_now();
        // Of 8: a reserve of 2 each, and a pool of 4, a quarter of it for one key.
        for n in 0..3u8 {
            let h = a.sign_with("POST", A, P, now, &[n; 16]);
            assert_eq!(check(&v, &h, P, now), Ok("alice"));
        }
        let h = a.sign_with("POST", A, P, now, &[9; 16]);
        assert_eq!(
            check(&v, &h, P, now),
            Err(AuthError::Busy),
            "alice's share is full"
        );
        let h = b.sign_with("POST", A, P, now, &[9; 16]);
        assert_eq!(check(&v, &h, P, now), Ok("bob"), "bob is not starved");
    }

    #[test]
    fn a_few_keys_cannot_starve_the_others() {
        let keys: Vec<PrivateKey> = (0..10)
            .map(|_| PrivateKey::generate().expect("gen"))
            .collect();
        let v = Verifier::new(keys.iter().map(|k| (k.public(), "k")), 1000);
        let keys: Vec<Signer> = keys.into_iter().map(Signer::new).collect();
        let now = unix_now();
        let mut nonce = 0u128;
        let mut sign = |k: &Signer| {
            nonce += 1;
            check(
                &v,
                &k.sign_with("POST", A, P, now, &nonce.to_le_bytes()),
                P,
                now,
            )
        };
        // Four keys sign as fast as they can. Of 1000: a reserve of 50 each, and a pool of
        // 500, at most 125 of it for one key.
        for k in &keys[..4] {
            let mut taken = 0;
            while sign(k).is_ok() {
                taken += 1;
            }
            assert_eq!(taken, 175, "a key's share");
        }
        // The pool is gone, and every other key still has its reserve.
        for k in &keys[4..] {
            for _ in 0..50 {
                assert_eq!(sign(k), Ok("k"));
            }
            assert_eq!(sign(k), Err(AuthError::Busy));
        }
    }

    #[test]
    fn nonce_cache_is_bounded_and_expires() {
        let (s, v) = setup(8);
        let now = unix_now();
        // Its reserve of 4 and a quarter of the pool of 4.
        for n in 0..5u8 {
            let h = s.sign_with("POST", A, P, now, &[n; 16]);
            assert_eq!(check(&v, &h, P, now), Ok("alice"));
        }
        let h = s.sign_with("POST", A, P, now, &[9; 16]);
        assert_eq!(check(&v, &h, P, now), Err(AuthError::Busy));
        // Once the first ones expire they are forgotten and room is made.
        let later = now + MAX_AGE_SECS + MAX_SKEW_SECS + 1;
        let h = s.sign_with("POST", A, P, later, &[9; 16]);
        assert_eq!(check(&v, &h, P, later), Ok("alice"));
    }

    #[test]
    fn nonce_cache_has_a_global_bound() {
        let keys: Vec<PrivateKey> = (0..5)
            .map(|_| PrivateKey::generate().expect("gen"))
            .collect();
        let names = ["a", "b", "c", "d", "e"];
        let v = Verifier::new(keys.iter().map(|k| k.public()).zip(names), 4);
        let now = unix_now();
        for (k, name) in keys.iter().zip(names).take(4) {
            let h = Signer::new(k.clone()).sign_with("POST", A, P, now, &[1; 16]);
            assert_eq!(check(&v, &h, P, now), Ok(name));
        }
        let h = Signer::new(keys[4].clone()).sign_with("POST", A, P, now, &[1; 16]);
        assert_eq!(check(&v, &h, P, now), Err(AuthError::Busy));
    }

    #[test]
    fn malformed_headers() {
        let (s, v) = setup(10);
        let h = s.sign("POST", A, P);
        let now = unix_now();
        let with_input = |input| ReceivedHeaders {
            input,
            ..h.as_received()
        };
        assert!(matches!(
            v.verify("POST", &[A], P, with_input(None), now),
            Err(AuthError::Malformed(_))
        ));
        let long = format!("{}{}", h.input, "x".repeat(600));
        assert!(matches!(
            v.verify("POST", &[A], P, with_input(Some(&long)), now),
            Err(AuthError::Malformed(_))
        ));
        let other_components = h.input.replace(r#""@path")"#, r#""@path" "@query")"#);
        assert!(matches!(
            v.verify("POST", &[A], P, with_input(Some(&other_components)), now),
            Err(AuthError::Malformed(_))
        ));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A relay that knows `key` under the name `alice` and answers to `authority`.
        fn verify(
            key: &PrivateKey,
            authority: &str,
            (method, path): (&str, &str),
            h: &SignedHeaders,
            now: u64,
        ) -> Result<&'static str, AuthError> {
            let v = Verifier::new([(key.public(), "alice")], 16);
            v.verify(method, &[authority], path, h.as_received(), now)
        }

        /// Request components as the endpoints send them: a method, a lowercase authority and
        /// a path of names.
        fn request() -> impl Strategy<Value = (String, String, String)> {
            (
                "[A-Z]{3,7}",
                "[a-z0-9.-]{1,40}(:[0-9]{1,5})?",
                "(/[A-Za-z0-9._-]{1,20}){1,6}",
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            #[test]
            fn what_is_signed_verifies(
                seed in any::<[u8; 32]>(),
                (method, authority, path) in request(),
                created in 1_000_000_000u64..4_000_000_000,
                age in 0u64..=MAX_AGE_SECS,
                nonce in any::<[u8; NONCE_LEN]>(),
            ) {
                let key = PrivateKey::from_seed(&seed);
                let h = Signer::new(key.clone()).sign_with(&method, &authority, &path, created, &nonce);
                prop_assert_eq!(
                    verify(&key, &authority, (&method, &path), &h, created + age),
                    Ok("alice")
                );
            }

            /// One byte changed in any signed component (the method, the authority, the path,
            /// either header) and the request is refused.
            #[test]
            fn any_one_byte_changed_is_refused(
                seed in any::<[u8; 32]>(),
                (method, authority, path) in request(),
                nonce in any::<[u8; NONCE_LEN]>(),
                which in 0usize..5,
                at in any::<prop::sample::Index>(),
                byte in any::<u8>(),
            ) {
                let key = PrivateKey::from_seed(&seed);
                let now = 1_700_000_000;
                let h = Signer::new(key.clone()).sign_with(&method, &authority, &path, now, &nonce);
                let mut parts = [
                    method.into_bytes(),
                    authority.into_bytes(),
                    path.into_bytes(),
                    h.input.into_bytes(),
                    h.signature.into_bytes(),
                ];
                let part = &mut parts[which];
                let i = at.index(part.len());
                prop_assume!(part[i] != byte);
                part[i] = byte;
                let text: Vec<String> = parts
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                let changed = SignedHeaders {
                    input: text[3].clone(),
                    signature: text[4].clone(),
                    authority: h.authority,
                };
                prop_assert!(
                    verify(&key, &text[1], (&text[0], &text[2]), &changed, now).is_err(),
                    "accepted with component {} changed at byte {}", which, i
                );
            }
        }
    }
}
