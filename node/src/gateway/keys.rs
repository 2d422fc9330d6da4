//! Usage plans and API keys, as records in the replicated state.
//!
//! - A plan `plan/<name>`: a rate (requests per second, fractions allowed), a burst, and an
//!   optional daily quota per key.
//! - A key `apikey/<name>`: the plan, a public id and the blake3 hash of the key. The key is
//!   `mw_<id>_<secret>` (id: 12 hex digits, secret: 64), shown once when it is created. A
//!   presented key is looked up by its id and accepted only if its blake3 hash equals the
//!   stored one; `blake3::Hash` compares in constant time. Revoking keeps the record (so the
//!   key gets 403, not 401).

use serde::{Deserialize, Serialize};

use super::{RouteError, changed};
use crate::node::NodeState;
use crate::services::now_ms;

const PLAN_PREFIX: &str = "plan/";
const KEY_PREFIX: &str = "apikey/";
/// Largest rate a plan may set, per second.
pub const MAX_RATE: f64 = 1_000_000.0;

/// A usage plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Name, like a function name.
    pub name: String,
    /// Requests per second.
    pub rate_per_second: f64,
    /// Requests allowed at once above the rate.
    pub burst: u32,
    /// Requests per key per UTC day; 0 for none.
    pub quota_per_day: u64,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
}

/// An API key as stored: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Name.
    pub name: String,
    /// The plan; empty for none.
    pub plan: String,
    /// Public id (part of the key).
    pub id: String,
    /// blake3 of the whole key, hex.
    pub hash: String,
    /// Revoked keys get 403.
    pub revoked: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Revocation time, ms since the epoch; 0 while valid.
    pub revoked_ms: u64,
}

impl ApiKey {
    /// Whether `presented` is this key (constant-time comparison of the hashes).
    pub fn verify(&self, presented: &str) -> bool {
        let Ok(stored) = blake3::Hash::from_hex(&self.hash) else {
            return false;
        };
        blake3::hash(presented.as_bytes()) == stored
    }
}

/// The public id inside a key `mw_<id>_<secret>`.
pub fn key_id(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix("mw_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && !secret.is_empty()).then_some(id)
}

fn check_name(what: &str, name: &str) -> Result<(), RouteError> {
    crate::functions::validate_name(name).map_err(|_| {
        RouteError::Invalid(format!(
            "{what} name {name:?}: 1 to 63 of a-z, 0-9 and '-', starting with a letter"
        ))
    })
}

fn read<T: serde::de::DeserializeOwned>(node: &NodeState, prefix: &str) -> Vec<T> {
    let replica = node.replica.lock().expect("replica lock");
    replica
        .map()
        .list(prefix)
        .filter_map(|e| serde_json::from_slice(e.value.as_deref()?).ok())
        .collect()
}

fn store<T: Serialize>(node: &NodeState, key: &str, value: &T) -> Result<(), RouteError> {
    node.write(
        key,
        Some(serde_json::to_vec(value).expect("records serialize")),
    )
    .map_err(|e| RouteError::State(e.to_string()))?;
    changed();
    Ok(())
}

/// Every plan.
pub fn plans(node: &NodeState) -> Vec<Plan> {
    read(node, PLAN_PREFIX)
}

/// Creates or replaces a plan.
pub fn create_plan(node: &NodeState, mut plan: Plan) -> Result<Plan, RouteError> {
    check_name("plan", &plan.name)?;
    if !(plan.rate_per_second.is_finite()
        && plan.rate_per_second > 0.0
        && plan.rate_per_second <= MAX_RATE)
    {
        return Err(RouteError::Invalid(format!(
            "rate {}/s: more than 0 and at most {MAX_RATE}/s",
            plan.rate_per_second
        )));
    }
    // Governor's period is in nanoseconds: slower than one per ~50 days is not a rate.
    if plan.rate_per_second < 1.0 / (86_400.0 * 30.0) {
        return Err(RouteError::Invalid(
            "rate: at least one request per 30 days".into(),
        ));
    }
    if plan.burst == 0 || plan.burst > 1_000_000 {
        return Err(RouteError::Invalid(format!(
            "burst {}: 1 to 1000000",
            plan.burst
        )));
    }
    plan.created_ms = now_ms();
    store(node, &format!("{PLAN_PREFIX}{}", plan.name), &plan)?;
    Ok(plan)
}

/// Removes a plan that no key and no route uses.
pub fn remove_plan(node: &NodeState, name: &str) -> Result<(), RouteError> {
    if !plans(node).iter().any(|p| p.name == name) {
        return Err(RouteError::Unknown(format!("no plan {name:?}")));
    }
    let users: Vec<String> = keys(node)
        .into_iter()
        .filter(|k| k.plan == name && !k.revoked)
        .map(|k| k.name)
        .collect();
    if !users.is_empty() {
        return Err(RouteError::InUse(format!(
            "plan {name:?} is used by the keys {}; revoke them first",
            users.join(", ")
        )));
    }
    let routes: Vec<String> = super::list(node)
        .into_iter()
        .filter(|r| r.plans.iter().any(|p| p == name))
        .map(|r| r.label())
        .collect();
    if !routes.is_empty() {
        return Err(RouteError::InUse(format!(
            "plan {name:?} is allowed on the routes {}; change them first",
            routes.join(", ")
        )));
    }
    node.write(&format!("{PLAN_PREFIX}{name}"), None)
        .map_err(|e| RouteError::State(e.to_string()))?;
    changed();
    Ok(())
}

/// Every key (hashes only).
pub fn keys(node: &NodeState) -> Vec<ApiKey> {
    read(node, KEY_PREFIX)
}

/// Creates a key; returns its record and the key itself, which is stored nowhere.
pub fn create_key(
    node: &NodeState,
    name: &str,
    plan: &str,
) -> Result<(ApiKey, String), RouteError> {
    check_name("key", name)?;
    if !plan.is_empty() && !plans(node).iter().any(|p| p.name == plan) {
        return Err(RouteError::Unknown(format!("no plan {plan:?}")));
    }
    if keys(node).iter().any(|k| k.name == name) {
        return Err(RouteError::Exists(format!(
            "a key named {name:?} exists (revoked keys keep their name)"
        )));
    }
    let id = hex::encode(rand::random::<[u8; 6]>());
    let secret = format!("mw_{id}_{}", hex::encode(rand::random::<[u8; 32]>()));
    let key = ApiKey {
        name: name.to_string(),
        plan: plan.to_string(),
        id,
        hash: blake3::hash(secret.as_bytes()).to_hex().to_string(),
        revoked: false,
        created_ms: now_ms(),
        revoked_ms: 0,
    };
    store(node, &format!("{KEY_PREFIX}{name}"), &key)?;
    Ok((key, secret))
}

/// Revokes a key (idempotent).
pub fn revoke_key(node: &NodeState, name: &str) -> Result<ApiKey, RouteError> {
    let Some(mut key) = keys(node).into_iter().find(|k| k.name == name) else {
        return Err(RouteError::Unknown(format!("no key {name:?}")));
    };
    if !key.revoked {
        key.revoked = true;
        key.revoked_ms = now_ms();
        store(node, &format!("{KEY_PREFIX}{name}"), &key)?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_verify_only_themselves() {
        let secret = "mw_0123456789ab_secret";
        let key = ApiKey {
            name: "k".into(),
            plan: String::new(),
            id: "0123456789ab".into(),
            hash: blake3::hash(secret.as_bytes()).to_hex().to_string(),
            revoked: false,
            created_ms: 0,
            revoked_ms: 0,
        };
        assert!(key.verify(secret));
        assert!(!key.verify("mw_0123456789ab_secreT"));
        assert!(!key.verify(""));
        assert_eq!(key_id(secret), Some("0123456789ab"));
        assert_eq!(key_id("mw_short_x"), None);
        assert_eq!(key_id("mw_0123456789ab_"), None);
        assert_eq!(key_id("0123456789ab"), None);
    }
}
