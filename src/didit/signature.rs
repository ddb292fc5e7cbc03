//! Didit webhook signatures (HMAC-SHA256, lowercase hex), computed and verified the way Didit's own reference code
//! does (didit-contract.md §9):
//!
//! - `X-Signature`: over the raw body bytes;
//! - `X-Signature-V2`: over the canonical JSON of the parsed body (keys sorted recursively, integer-valued floats
//!   shortened to integers, compact separators), so proxies that re-serialise the body do not break it. Didit's
//!   code samples emit raw UTF-8, its header table calls the form "ASCII-escaped" (non-ASCII as `\uXXXX`, Python's
//!   `ensure_ascii=True`); the two differ only for bodies with non-ASCII text (names such as "José"), so
//!   [`verify_v2`] accepts either form and [`sign_v2`] signs the UTF-8 one (contract §9, conflict 1);
//! - `X-Signature-Simple`: over `"{timestamp}:{session_id}:{status}:{webhook_type}"`.
//!
//! The sandbox signs with these functions and the issuer's webhook intake verifies with them. Verification compares
//! in constant time.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// `hex(HMAC_SHA256(secret, bytes))`.
pub fn hmac_hex(secret: &[u8], bytes: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(bytes);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks `hex_signature` against `HMAC_SHA256(secret, bytes)` in constant time. A malformed hex string is a mismatch.
pub fn verify_hmac_hex(secret: &[u8], bytes: &[u8], hex_signature: &str) -> bool {
    let Ok(expected) = hex::decode(hex_signature.trim()) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(bytes);
    mac.verify_slice(&expected).is_ok()
}

/// The canonical form `X-Signature-V2` signs: sorted keys, shortened floats, compact, UTF-8.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => {
            out.push_str(&serde_json::to_string(value).expect("scalars serialise"))
        }
        Value::Number(n) => {
            if n.is_f64() {
                let f = n.as_f64().unwrap_or(0.0);
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e18 {
                    out.push_str(&(f as i64).to_string());
                    return;
                }
            }
            out.push_str(&n.to_string());
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(key).expect("strings serialise"));
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
    }
}

/// `X-Signature` of a raw body.
pub fn sign_raw(secret: &str, body: &[u8]) -> String {
    hmac_hex(secret.as_bytes(), body)
}

/// `X-Signature-V2` of a parsed body.
pub fn sign_v2(secret: &str, body: &Value) -> String {
    hmac_hex(secret.as_bytes(), canonical_json(body).as_bytes())
}

/// The string `X-Signature-Simple` signs.
pub fn simple_message(
    timestamp: i64,
    session_id: &str,
    status: &str,
    webhook_type: &str,
) -> String {
    format!("{timestamp}:{session_id}:{status}:{webhook_type}")
}

/// `X-Signature-Simple` of a body's fields.
pub fn sign_simple(
    secret: &str,
    timestamp: i64,
    session_id: &str,
    status: &str,
    webhook_type: &str,
) -> String {
    hmac_hex(
        secret.as_bytes(),
        simple_message(timestamp, session_id, status, webhook_type).as_bytes(),
    )
}

/// The ASCII-escaped canonical form: [`canonical_json`] with every character outside `' '..='~'` written as
/// `\uXXXX` (UTF-16 surrogate pairs above U+FFFF, lowercase hex), byte for byte what Python's
/// `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)` gives (DEL included). Outside
/// strings canonical JSON is ASCII already, and control characters inside them are escaped the same way by
/// serde_json and Python, so escaping the whole text is exact.
pub fn canonical_json_ascii(value: &Value) -> String {
    let canonical = canonical_json(value);
    let mut out = String::with_capacity(canonical.len());
    for c in canonical.chars() {
        if (' '..='~').contains(&c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// `X-Signature-V2` over the ASCII-escaped canonical form (what a sender following Didit's header table signs).
pub fn sign_v2_ascii(secret: &str, body: &Value) -> String {
    hmac_hex(secret.as_bytes(), canonical_json_ascii(body).as_bytes())
}

/// Verifies `X-Signature-V2` against a parsed body, in either canonical form (raw UTF-8 or ASCII-escaped). The
/// escaped form is only tried when it differs, i.e. when the body has non-ASCII text.
pub fn verify_v2(secret: &str, body: &Value, signature: &str) -> bool {
    let canonical = canonical_json(body);
    if verify_hmac_hex(secret.as_bytes(), canonical.as_bytes(), signature) {
        return true;
    }
    !canonical.is_ascii()
        && verify_hmac_hex(
            secret.as_bytes(),
            canonical_json_ascii(body).as_bytes(),
            signature,
        )
}

/// Verifies `X-Signature` against the raw body.
pub fn verify_raw(secret: &str, body: &[u8], signature: &str) -> bool {
    verify_hmac_hex(secret.as_bytes(), body, signature)
}

/// Verifies `X-Signature-Simple` against the body's fields.
pub fn verify_simple(
    secret: &str,
    timestamp: i64,
    session_id: &str,
    status: &str,
    webhook_type: &str,
    signature: &str,
) -> bool {
    verify_hmac_hex(
        secret.as_bytes(),
        simple_message(timestamp, session_id, status, webhook_type).as_bytes(),
        signature,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret_123";
    const RAW: &str = r#"{"session_id":"11111111-2222-3333-4444-555555555555","status":"Approved","webhook_type":"status.updated","created_at":1753630666,"timestamp":1753630666,"vendor_data":"user-1","workflow_id":"9f9b1234-aaaa-bbbb-cccc-1234567890ab","decision":{"session_kind":"user","id_verifications":[{"status":"Approved","first_name":"José","last_name":"Müller 日本","age":45.0}],"face_matches":[{"status":"Approved","score":91.5}]}}"#;
    const CANONICAL: &str = r#"{"created_at":1753630666,"decision":{"face_matches":[{"score":91.5,"status":"Approved"}],"id_verifications":[{"age":45,"first_name":"José","last_name":"Müller 日本","status":"Approved"}],"session_kind":"user"},"session_id":"11111111-2222-3333-4444-555555555555","status":"Approved","timestamp":1753630666,"vendor_data":"user-1","webhook_type":"status.updated","workflow_id":"9f9b1234-aaaa-bbbb-cccc-1234567890ab"}"#;

    #[test]
    fn reproduces_the_contract_vectors() {
        let body: Value = serde_json::from_str(RAW).unwrap();
        assert_eq!(canonical_json(&body), CANONICAL);
        assert_eq!(
            sign_raw(SECRET, RAW.as_bytes()),
            "6a115fc48648f6d5eb2455d768357776be5ebdb30df4f1f6c3ddae862b4f3501"
        );
        assert_eq!(
            sign_v2(SECRET, &body),
            "e2154d28697b6e11f0468290adee90bee456f69f318423a7689b9d31fd067c84"
        );
        assert_eq!(
            sign_simple(
                SECRET,
                1753630666,
                "11111111-2222-3333-4444-555555555555",
                "Approved",
                "status.updated"
            ),
            "2165393b7cbed2a0f9eb6270090dac1011f6331e93164a309e9480ec43e3d779"
        );
    }

    /// The ASCII-escaped form of the contract's body, and its HMAC computed with Python 3:
    /// `json.dumps(shorten_floats(body), sort_keys=True, separators=(",",":"), ensure_ascii=True)`
    /// (the contract lists the same hex as the `ensure_ascii=True` variant).
    const CANONICAL_ASCII: &str = r#"{"created_at":1753630666,"decision":{"face_matches":[{"score":91.5,"status":"Approved"}],"id_verifications":[{"age":45,"first_name":"Jos\u00e9","last_name":"M\u00fcller \u65e5\u672c","status":"Approved"}],"session_kind":"user"},"session_id":"11111111-2222-3333-4444-555555555555","status":"Approved","timestamp":1753630666,"vendor_data":"user-1","webhook_type":"status.updated","workflow_id":"9f9b1234-aaaa-bbbb-cccc-1234567890ab"}"#;
    const V2_UTF8: &str = "e2154d28697b6e11f0468290adee90bee456f69f318423a7689b9d31fd067c84";
    const V2_ASCII: &str = "b30fb25f432c665fd6c3d7153e661160a2c530bb58148fe71a564438f28b3cc7";

    #[test]
    fn v2_accepts_both_canonical_forms_and_nothing_else() {
        let body: Value = serde_json::from_str(RAW).unwrap();
        assert_eq!(canonical_json_ascii(&body), CANONICAL_ASCII);
        assert_eq!(sign_v2(SECRET, &body), V2_UTF8);
        assert_eq!(sign_v2_ascii(SECRET, &body), V2_ASCII);
        assert!(verify_v2(SECRET, &body, V2_UTF8), "raw UTF-8 form");
        assert!(verify_v2(SECRET, &body, V2_ASCII), "ASCII-escaped form");
        assert!(!verify_v2("other", &body, V2_ASCII));
        let mut changed = body.clone();
        changed["status"] = Value::from("Declined");
        assert!(!verify_v2(SECRET, &changed, V2_ASCII));
        assert!(!verify_v2(SECRET, &changed, V2_UTF8));
        // A non-BMP character (surrogate pair), DEL and a tab, as Python escapes them (HMAC from Python 3).
        let odd = serde_json::json!({"name": "\u{1F600}\u{7f}\u{e9}", "n": "a\tb"});
        assert_eq!(
            canonical_json_ascii(&odd),
            r#"{"n":"a\tb","name":"\ud83d\ude00\u007f\u00e9"}"#
        );
        assert!(verify_v2(
            SECRET,
            &odd,
            "bfd9d38ed5fdaaed573b887e4dba89362a821cd09552989e8407976b2128493f"
        ));
        // An ASCII-only body has one form.
        let plain = serde_json::json!({"a": 1});
        assert_eq!(canonical_json_ascii(&plain), canonical_json(&plain));
    }

    #[test]
    fn verification_is_strict() {
        let body: Value = serde_json::from_str(RAW).unwrap();
        let good = sign_v2(SECRET, &body);
        assert!(verify_v2(SECRET, &body, &good));
        assert!(!verify_v2("other", &body, &good));
        assert!(!verify_v2(SECRET, &body, "zz"));
        assert!(!verify_v2(SECRET, &body, &good[..10]));
    }
}
