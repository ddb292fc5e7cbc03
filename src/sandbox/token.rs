//! Share tokens: real HS256 JWTs (`{"alg":"HS256","typ":"JWT"}`, base64url without padding) whose claims are
//! exactly `session_id`, `session_kind`, `from_application_id`, `for_application_id`, `iat` and `exp`, signed with
//! a secret drawn at random when the sandbox starts (as Didit's own signing key, it is never published).
//!
//! This module mints and verifies; it does not decide expiry (the virtual clock lives in the state) nor who may
//! import (that is the import route's precedence table).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::didit::wire::ShareTokenClaims;

type HmacSha256 = Hmac<Sha256>;

/// The JOSE header every token carries.
const HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Why a token was refused (all of them are Didit's 401 `invalid_share_token`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts, or parts that do not decode.
    #[error("share token is not a well-formed JWT")]
    Malformed,
    /// The header names another algorithm (including `none`).
    #[error("share token uses an unsupported algorithm")]
    Algorithm,
    /// The signature does not verify with this sandbox's key.
    #[error("share token signature does not verify")]
    Signature,
    /// The payload lacks a required claim or has one of the wrong type.
    #[error("share token claims are invalid")]
    Claims,
}

/// The sandbox's HS256 signing key.
#[derive(Clone)]
pub struct TokenKey {
    secret: [u8; 32],
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    /// A fresh random key.
    pub fn random() -> TokenKey {
        TokenKey {
            secret: rand::random(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length")
    }

    /// Signs `claims` into a compact JWT.
    pub fn mint(&self, claims: &ShareTokenClaims) -> String {
        let header = URL_SAFE_NO_PAD.encode(HEADER_JSON);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    /// Checks the header, the signature (in constant time) and the claims' shape. A token without `session_kind`
    /// (minted before Didit unified KYC and KYB sharing) is read as `user`, as Didit does.
    pub fn verify(&self, token: &str) -> Result<ShareTokenClaims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header_bytes = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| TokenError::Malformed)?;
        let header_json: serde_json::Value =
            serde_json::from_slice(&header_bytes).map_err(|_| TokenError::Malformed)?;
        if header_json.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(TokenError::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::Signature)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let mut claims: ShareTokenClaims =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Claims)?;
        if claims.session_kind.is_none() {
            claims.session_kind = Some(crate::didit::wire::SessionKind::User);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didit::wire::SessionKind;

    fn claims() -> ShareTokenClaims {
        ShareTokenClaims {
            session_id: "s".into(),
            session_kind: Some(SessionKind::Business),
            from_application_id: "a".into(),
            for_application_id: "b".into(),
            iat: 1_753_630_666,
            exp: 1_753_634_266,
        }
    }

    #[test]
    fn round_trips_and_has_the_documented_shape() {
        let key = TokenKey::random();
        let token = key.mint(&claims());
        assert!(token.starts_with("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."));
        assert!(!token.contains('='));
        assert_eq!(key.verify(&token).unwrap(), claims());
        let payload: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        let mut keys: Vec<&String> = payload.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "exp",
                "for_application_id",
                "from_application_id",
                "iat",
                "session_id",
                "session_kind"
            ]
        );
    }

    #[test]
    fn refuses_forgeries() {
        let key = TokenKey::random();
        let token = key.mint(&claims());
        assert_eq!(
            TokenKey::random().verify(&token),
            Err(TokenError::Signature)
        );
        let mut forged = claims();
        forged.for_application_id = "c".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let parts: Vec<&str> = token.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(key.verify(&tampered), Err(TokenError::Signature));
        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        assert_eq!(
            key.verify(&format!("{none_header}.{}.", parts[1])),
            Err(TokenError::Algorithm)
        );
        assert_eq!(key.verify("abc"), Err(TokenError::Malformed));
        assert_eq!(key.verify("a.b.c.d"), Err(TokenError::Malformed));
    }

    #[test]
    fn old_tokens_without_kind_are_user_tokens() {
        let key = TokenKey::random();
        let mut old = claims();
        old.session_kind = None;
        assert_eq!(
            key.verify(&key.mint(&old)).unwrap().session_kind,
            Some(SessionKind::User)
        );
    }
}
