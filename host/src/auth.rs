//! Workspace tokens: minting, hashing and checking (spec section 3).
//!
//! A token is 32 random bytes, base64url without padding; only its SHA-256
//! hash is stored, with an 8-character prefix for display. Hashes are compared
//! in constant time. A workspace that never had a token is let in once
//! (bootstrap): its first register mints one. Revoking every token closes
//! it again, until the operator issues a token or reopens bootstrap.
//!
//! **Invariant:** a token's plaintext is never logged or stored; it leaves the
//! process only in the register response that minted it, or on the CLI that
//! issued it.
//!
//! The platform inbound secret is the other way round: the platform proves
//! itself to the workspace with it, so it is stored as it is and handed to
//! the runtime in every register and heartbeat response. It is never logged
//! (its `Debug` is redacted).

use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::NewToken;

/// A freshly minted token: the plaintext to hand out once, and what to store.
pub struct MintedToken {
    pub plaintext: String,
    pub stored: NewToken,
}

/// Mint a token.
pub fn mint() -> Result<MintedToken, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let plaintext = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let stored = NewToken {
        hash: hash(&plaintext),
        prefix: plaintext.chars().take(8).collect(),
    };
    Ok(MintedToken { plaintext, stored })
}

/// A workspace's platform inbound secret: 32 random bytes, base64url
/// without padding. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct InboundSecret(String);

impl InboundSecret {
    /// A new random secret.
    pub fn mint() -> Result<InboundSecret, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(InboundSecret(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        ))
    }

    /// A stored secret.
    pub fn from_stored(text: String) -> InboundSecret {
        InboundSecret(text)
    }

    /// The secret itself, for the response and the store only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for InboundSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InboundSecret(<redacted>)")
    }
}

/// SHA-256 of the token's text.
pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The verdict of the auth check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthCheck {
    /// A live token matched.
    Token,
    /// The workspace has no live token: the bootstrap case.
    Bootstrap,
    /// A live token exists and no bearer was sent.
    Missing,
    /// A bearer was sent and matches no live token of this workspace.
    Invalid,
}

/// Extract the token from an `Authorization` header value: the prefix must be
/// exactly `Bearer `; anything else counts as no token.
pub fn bearer(header: Option<&[u8]>) -> Option<&str> {
    let value = std::str::from_utf8(header?).ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then_some(token)
}

/// Check `bearer` against the workspace's live token hashes. With none,
/// the request is let in to bootstrap a token only if `bootstrap` (the
/// workspace never had a token, or the operator reopened it); a workspace
/// whose tokens were revoked refuses everyone.
pub fn check(bearer: Option<&str>, live_hashes: &[Vec<u8>], bootstrap: bool) -> AuthCheck {
    if live_hashes.is_empty() && bootstrap {
        return AuthCheck::Bootstrap;
    }
    let Some(token) = bearer else {
        return AuthCheck::Missing;
    };
    let presented = hash(token);
    // Compare against every hash without stopping early.
    let matched = live_hashes
        .iter()
        .fold(subtle::Choice::from(0), |acc, h| acc | presented.ct_eq(h));
    if bool::from(matched) {
        AuthCheck::Token
    } else {
        AuthCheck::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_secrets_are_43_chars_and_never_debug_printed() {
        let secret = InboundSecret::mint().unwrap();
        assert_eq!(secret.expose().len(), 43);
        assert!(!format!("{secret:?}").contains(secret.expose()));
        assert_ne!(secret, InboundSecret::mint().unwrap());
    }

    #[test]
    fn minted_tokens_are_43_chars_and_hash_to_what_is_stored() {
        let t = mint().unwrap();
        assert_eq!(t.plaintext.len(), 43);
        assert_eq!(t.stored.hash, hash(&t.plaintext));
        assert_eq!(t.stored.prefix, &t.plaintext[..8]);
    }

    #[test]
    fn bearer_prefix_must_be_exact() {
        assert_eq!(bearer(Some(b"Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some(b"bearer abc")), None);
        assert_eq!(bearer(Some(b"Bearer ")), None);
        assert_eq!(bearer(Some(b"Basic abc")), None);
        assert_eq!(bearer(Some(&[0xff, 0xfe])), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn check_covers_bootstrap_missing_invalid_and_match() {
        let t = mint().unwrap();
        let live = vec![t.stored.hash.clone()];
        assert_eq!(check(None, &[], true), AuthCheck::Bootstrap);
        assert_eq!(check(Some("stale"), &[], true), AuthCheck::Bootstrap);
        assert_eq!(check(None, &live, false), AuthCheck::Missing);
        assert_eq!(check(Some("wrong"), &live, false), AuthCheck::Invalid);
        assert_eq!(check(Some(&t.plaintext), &live, false), AuthCheck::Token);
        // Revoked: no live token and bootstrap closed.
        assert_eq!(check(None, &[], false), AuthCheck::Missing);
        assert_eq!(check(Some(&t.plaintext), &[], false), AuthCheck::Invalid);
    }
}
