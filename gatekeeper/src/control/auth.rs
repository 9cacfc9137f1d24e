//! Bearer tokens, and who a request comes from. Each token has a name (what the audit log
//! records) and a role; the tokens are hashed once read, requests are compared by hash in
//! constant time, and the store keeps only the hashes.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Only reads (GET, HEAD).
    Reader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Reader => "reader",
        }
    }
}

/// A bearer token read from its file.
#[derive(Clone)]
pub struct Token {
    /// Who holds it: recorded in the audit log for each write made with it.
    pub name: String,
    pub role: Role,
    pub secret: String,
    /// Where it was read from (for the audit log of credential changes).
    pub source: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

/// The API's tokens (their secrets are never logged: `Debug` shows names and roles).
#[derive(Clone, Debug, Default)]
pub struct Tokens(pub Vec<Token>);

impl Tokens {
    /// An admin token named `admin` and a reader token named `reader`, where given.
    pub fn admin_reader(admin: Option<&str>, reader: Option<&str>) -> Self {
        let token = |name: &str, role, secret: &str| Token {
            name: name.into(),
            role,
            secret: secret.into(),
            source: "given".into(),
        };
        Self(
            [admin.map(|s| token("admin", Role::Admin, s)), reader.map(|s| token("reader", Role::Reader, s))]
                .into_iter()
                .flatten()
                .collect(),
        )
    }
}

/// Who made a change: a token's name and the client's address for API requests, or a part of
/// the daemon (`daemon`, `netskope`, `expiry`) for its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub address: Option<IpAddr>,
}

/// The names the daemon records its own changes under (the policy file at start and on
/// SIGHUP, the `[netskope]` section, the Netskope worker, credential changes, and a request the
/// API could not attribute): no token may take one, in any case.
pub const DAEMON_ACTORS: [&str; 5] = ["policy-file", "config", "netskope", "daemon", "unknown"];

impl Actor {
    /// An actor with no address: the daemon itself, or a caller outside the API.
    pub fn named(name: &str) -> Self {
        Self { name: name.into(), address: None }
    }

    /// Whether `name` is one of [`DAEMON_ACTORS`] (whatever its case).
    pub fn is_daemons(name: &str) -> bool {
        DAEMON_ACTORS.iter().any(|d| d.eq_ignore_ascii_case(name))
    }
}

impl From<&str> for Actor {
    fn from(name: &str) -> Self {
        Self::named(name)
    }
}

impl From<&Actor> for Actor {
    fn from(a: &Actor) -> Self {
        a.clone()
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            Some(a) => write!(f, "{} from {a}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// SHA-256 of a token, hex: what the store keeps and what requests are compared against.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a request with this HTTP method only reads (a reader's token may make it).
pub fn is_read_only(method: &str) -> bool {
    matches!(method, "GET" | "HEAD")
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("this token may only read")]
    Forbidden,
}

/// Where a token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A 0600 file named in the configuration.
    File,
    /// Created through the API (`POST /tokens`); only its hash exists, in the store.
    Api,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Api => "api",
        }
    }
}

/// One token gatekeeper accepts: its name, role, origin and the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub role: Role,
    pub origin: Origin,
    pub hash: [u8; 32],
}

/// The tokens' hashes with their names and roles: the secrets are dropped once hashed.
#[derive(Debug, Default)]
pub struct Credentials {
    tokens: Vec<(String, Role, [u8; 32])>,
}

/// The credentials the API and `/metrics` check requests against, shared with the control
/// layer, which changes them (tokens created or revoked through the API take effect at once).
#[derive(Debug, Clone, Default)]
pub struct CredentialSet(std::sync::Arc<std::sync::RwLock<Vec<Credential>>>);

impl CredentialSet {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Credential>> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Credential>> {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the tokens read from files with `tokens`; those created through the API stay.
    pub fn set_files(&self, tokens: &Tokens) {
        let mut set = self.write();
        set.retain(|c| c.origin != Origin::File);
        let names: Vec<&str> = tokens.0.iter().map(|t| t.name.as_str()).collect();
        // A file token wins over an API token of the same name (the configuration is the
        // operator's last word).
        set.retain(|c| !names.contains(&c.name.as_str()));
        set.extend(tokens.0.iter().map(|t| Credential {
            name: t.name.clone(),
            role: t.role,
            origin: Origin::File,
            hash: digest(&t.secret),
        }));
    }

    pub fn insert(&self, credential: Credential) {
        let mut set = self.write();
        set.retain(|c| c.name != credential.name);
        set.push(credential);
    }

    pub fn remove(&self, name: &str) {
        self.write().retain(|c| c.name != name);
    }

    /// Name, role and origin of each token, by name.
    pub fn list(&self) -> Vec<(String, Role, Origin)> {
        let mut list: Vec<_> = self.read().iter().map(|c| (c.name.clone(), c.role, c.origin)).collect();
        list.sort();
        list
    }

    pub fn get(&self, name: &str) -> Option<(Role, Origin)> {
        self.read().iter().find(|c| c.name == name).map(|c| (c.role, c.origin))
    }

    /// The name of the token a request presents (see [`Credentials::actor`]).
    pub fn actor(&self, bearer: Option<&str>, read_only: bool) -> Result<String, AuthError> {
        let set = self.read();
        let creds = Credentials { tokens: set.iter().map(|c| (c.name.clone(), c.role, c.hash)).collect() };
        creds.actor(bearer, read_only).map(str::to_string)
    }
}

/// A new random token (256 bits from the kernel's generator, hex).
pub fn new_secret() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The SHA-256 of a token, from its hex form as the store keeps it.
pub fn hash_from_hex(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Why a token name cannot be used, if it cannot.
pub fn check_token_name(name: &str) -> Result<(), String> {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if !ok {
        return Err(format!("{name:?} must be 1 to 64 letters, digits, '.', '_', '@' or '-'"));
    }
    if Actor::is_daemons(name) {
        return Err(format!("{name:?} is what the daemon records its own changes as; choose another"));
    }
    Ok(())
}

impl Credentials {
    pub fn new(tokens: &Tokens) -> Self {
        Self { tokens: tokens.0.iter().map(|t| (t.name.clone(), t.role, digest(&t.secret))).collect() }
    }

    /// The name of the token a request presents in `bearer` (the `Authorization` header's
    /// value); `read_only` requests may come from a reader.
    pub fn actor(&self, bearer: Option<&str>, read_only: bool) -> Result<&str, AuthError> {
        // The scheme is case-insensitive (RFC 9110 11.1); the token is not.
        let presented = bearer
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(AuthError::Unauthorized)?;
        let presented = digest(presented);
        // Every token is compared, in constant time, so response times say nothing of which
        // (or whether one) matched.
        let mut found = None;
        for (name, role, hash) in &self.tokens {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some((name.as_str(), *role));
            }
        }
        match found {
            Some((name, Role::Admin)) => Ok(name),
            Some((name, Role::Reader)) if read_only => Ok(name),
            Some((_, Role::Reader)) => Err(AuthError::Forbidden),
            None => Err(AuthError::Unauthorized),
        }
    }
}

pub fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decide_the_actor() {
        let c = Credentials::new(&Tokens::admin_reader(Some("admin-token-0123456789"), Some(&"r".repeat(16))));
        assert_eq!(c.actor(Some("Bearer admin-token-0123456789"), false), Ok("admin"));
        assert_eq!(c.actor(Some(&format!("Bearer {}", "r".repeat(16))), true), Ok("reader"));
        assert_eq!(c.actor(Some(&format!("Bearer {}", "r".repeat(16))), false), Err(AuthError::Forbidden));
        assert_eq!(c.actor(Some("Bearer nope"), true), Err(AuthError::Unauthorized));
        assert_eq!(c.actor(None, true), Err(AuthError::Unauthorized));
        assert_eq!(c.actor(Some("admin-token-0123456789"), true), Err(AuthError::Unauthorized), "no Bearer prefix");
        assert_eq!(
            c.actor(Some("bearer admin-token-0123456789"), false),
            Ok("admin"),
            "the scheme is case-insensitive"
        );
        assert_eq!(c.actor(Some("BEARER admin-token-0123456789"), false), Ok("admin"));
        assert_eq!(
            c.actor(Some("Bearer ADMIN-token-0123456789"), false),
            Err(AuthError::Unauthorized),
            "the token is not"
        );
        assert_eq!(c.actor(Some("Basic admin-token-0123456789"), false), Err(AuthError::Unauthorized));
        assert!(is_read_only("GET") && is_read_only("HEAD") && !is_read_only("POST") && !is_read_only("PATCH"));
    }

    #[test]
    fn named_tokens_are_told_apart() {
        let token = |name: &str, role, secret: &str| Token {
            name: name.into(),
            role,
            secret: secret.into(),
            source: "test".into(),
        };
        let c = Credentials::new(&Tokens(vec![
            token("alice", Role::Admin, "alice-token-0123456789"),
            token("bob", Role::Admin, "bob-token-0123456789ab"),
            token("grafana", Role::Reader, "grafana-token-01234567"),
        ]));
        assert_eq!(c.actor(Some("Bearer alice-token-0123456789"), false), Ok("alice"));
        assert_eq!(c.actor(Some("Bearer bob-token-0123456789ab"), false), Ok("bob"));
        assert_eq!(c.actor(Some("Bearer grafana-token-01234567"), true), Ok("grafana"));
        assert_eq!(c.actor(Some("Bearer grafana-token-01234567"), false), Err(AuthError::Forbidden));
        let shown = format!("{:?}", Tokens(vec![token("alice", Role::Admin, "alice-token-0123456789")]));
        assert!(shown.contains("alice") && !shown.contains("alice-token"), "Debug never shows a secret: {shown}");
        let a = Actor { name: "alice".into(), address: Some("192.0.2.7".parse().unwrap()) };
        assert_eq!(a.to_string(), "alice from 192.0.2.7");
    }
}
