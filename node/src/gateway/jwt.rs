//! JWT auth per route (`jsonwebtoken`): HS256 with a shared secret and/or RS256 with a PEM
//! public key, the token in `Authorization: Bearer`. `exp` is required and checked (5 s of
//! leeway); with an audience configured, `aud` is required and must contain it. Any other
//! algorithm, including `none`, is refused.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::JwtConfig;

/// Leeway for `exp` and `nbf`, seconds.
const LEEWAY_S: u64 = 5;

/// The parsed keys of a route.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    audience: String,
}

/// Why a request's token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// No `Authorization: Bearer` token.
    Missing,
    /// A token that does not verify; the reason is safe to show.
    Invalid(String),
}

/// What a valid token says.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The `sub` claim, if any.
    pub subject: Option<String>,
}

impl Verifier {
    /// Parses a route's keys; the error says which is wrong.
    pub fn new(cfg: &JwtConfig) -> Result<Self, String> {
        let hs256 = if cfg.hs256_secret_hex.is_empty() {
            None
        } else {
            let secret = hex::decode(&cfg.hs256_secret_hex)
                .map_err(|_| "the HS256 secret is not hex".to_string())?;
            if secret.len() < 16 {
                return Err("the HS256 secret must be at least 16 bytes".into());
            }
            Some(DecodingKey::from_secret(&secret))
        };
        let rs256 = if cfg.rs256_public_key.is_empty() {
            None
        } else {
            Some(
                DecodingKey::from_rsa_pem(cfg.rs256_public_key.as_bytes())
                    .map_err(|e| format!("the RS256 key is not an RSA public key in PEM: {e}"))?,
            )
        };
        if hs256.is_none() && rs256.is_none() {
            return Err("JWT auth needs an HS256 secret or an RS256 public key".into());
        }
        if cfg.audience.len() > 200 || cfg.audience.chars().any(char::is_control) {
            return Err("the audience must be at most 200 printable characters".into());
        }
        Ok(Self {
            hs256,
            rs256,
            audience: cfg.audience.clone(),
        })
    }

    /// Checks the `Authorization` header of a request.
    pub fn verify(&self, authorization: Option<&[u8]>) -> Result<Identity, JwtError> {
        let Some(value) = authorization else {
            return Err(JwtError::Missing);
        };
        let text = std::str::from_utf8(value).map_err(|_| JwtError::Missing)?;
        let Some((scheme, token)) = text.trim().split_once(' ') else {
            return Err(JwtError::Missing);
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(JwtError::Missing);
        }
        let token = token.trim();
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| JwtError::Invalid("malformed token".into()))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| {
            JwtError::Invalid(format!("algorithm {:?} is not accepted here", header.alg))
        })?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_S;
        if self.audience.is_empty() {
            validation.validate_aud = false;
            validation.set_required_spec_claims(&["exp"]);
        } else {
            validation.set_audience(&[self.audience.as_str()]);
            validation.set_required_spec_claims(&["exp", "aud"]);
        }
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind::*;
                JwtError::Invalid(
                    match e.kind() {
                        ExpiredSignature => "token expired",
                        ImmatureSignature => "token not valid yet",
                        InvalidAudience => "wrong audience",
                        InvalidSignature => "bad signature",
                        MissingRequiredClaim(_) => "a required claim (exp or aud) is missing",
                        _ => "invalid token",
                    }
                    .into(),
                )
            })?;
        Ok(Identity {
            subject: data
                .claims
                .get("sub")
                .and_then(|s| s.as_str())
                .map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        crate::services::now_ms() / 1000
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn verifier(audience: &str) -> Verifier {
        Verifier::new(&JwtConfig {
            hs256_secret_hex: hex::encode(SECRET),
            rs256_public_key: String::new(),
            audience: audience.into(),
        })
        .unwrap()
    }

    fn check(v: &Verifier, t: &str) -> Result<Identity, JwtError> {
        v.verify(Some(format!("Bearer {t}").as_bytes()))
    }

    #[test]
    fn hs256_accepts_and_rejects() {
        let v = verifier("api");
        let good = token(
            serde_json::json!({"sub": "ann", "aud": "api", "exp": now() + 60}),
            SECRET,
        );
        assert_eq!(check(&v, &good).unwrap().subject.as_deref(), Some("ann"));
        let expired = token(
            serde_json::json!({"aud": "api", "exp": now() - 3600}),
            SECRET,
        );
        assert_eq!(
            check(&v, &expired).unwrap_err(),
            JwtError::Invalid("token expired".into())
        );
        let wrong_aud = token(
            serde_json::json!({"aud": "other", "exp": now() + 60}),
            SECRET,
        );
        assert_eq!(
            check(&v, &wrong_aud).unwrap_err(),
            JwtError::Invalid("wrong audience".into())
        );
        let no_aud = token(serde_json::json!({"exp": now() + 60}), SECRET);
        assert!(check(&v, &no_aud).is_err());
        let bad_sig = token(
            serde_json::json!({"aud": "api", "exp": now() + 60}),
            b"another secret, also 32 bytes...",
        );
        assert_eq!(
            check(&v, &bad_sig).unwrap_err(),
            JwtError::Invalid("bad signature".into())
        );
        let no_exp = token(serde_json::json!({"aud": "api"}), SECRET);
        assert!(check(&v, &no_exp).is_err());
        assert_eq!(v.verify(None).unwrap_err(), JwtError::Missing);
        assert_eq!(v.verify(Some(b"Basic abc")).unwrap_err(), JwtError::Missing);
        // alg none is refused.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJleHAiOjk5OTk5OTk5OTl9"
        );
        assert!(check(&v, &none).is_err());
    }

    #[test]
    fn without_an_audience_any_audience_passes() {
        let v = verifier("");
        let t = token(serde_json::json!({"aud": "x", "exp": now() + 60}), SECRET);
        assert!(check(&v, &t).is_ok());
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(Verifier::new(&JwtConfig::default()).is_err());
        assert!(
            Verifier::new(&JwtConfig {
                hs256_secret_hex: "zz".into(),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Verifier::new(&JwtConfig {
                rs256_public_key: "not a key".into(),
                ..Default::default()
            })
            .is_err()
        );
    }
}
