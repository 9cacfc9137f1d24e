//! Bearer tokens: who a request comes from. The tokens are hashed once read; requests are
//! compared by hash in constant time, and the store keeps only the hashes.

/// Bearer tokens read from the files named in the configuration.
#[derive(Clone, Default)]
pub struct Tokens {
    pub admin: Option<String>,
    pub reader: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("admin", &self.admin.is_some()).field("reader", &self.reader.is_some()).finish()
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

/// The tokens' hashes: the tokens themselves are dropped once hashed.
#[derive(Debug, Default)]
pub struct Credentials {
    admin: Option<String>,
    reader: Option<String>,
}

impl Credentials {
    pub fn new(tokens: &Tokens) -> Self {
        Self { admin: tokens.admin.as_deref().map(token_hash), reader: tokens.reader.as_deref().map(token_hash) }
    }

    /// The actor (`admin` or `reader`) of a request presenting `bearer` (the `Authorization`
    /// header's value); `read_only` requests may come from a reader.
    pub fn actor(&self, bearer: Option<&str>, read_only: bool) -> Result<&'static str, AuthError> {
        // The scheme is case-insensitive (RFC 9110 11.1); the token is not.
        let presented = bearer
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(AuthError::Unauthorized)?;
        let presented = token_hash(presented);
        let is = |t: &Option<String>| t.as_deref().is_some_and(|t| same(t, &presented));
        if is(&self.admin) {
            Ok("admin")
        } else if is(&self.reader) {
            if read_only { Ok("reader") } else { Err(AuthError::Forbidden) }
        } else {
            Err(AuthError::Unauthorized)
        }
    }
}

/// Constant-time comparison, so response times say nothing about a token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decide_the_actor() {
        let c =
            Credentials::new(&Tokens { admin: Some("admin-token-0123456789".into()), reader: Some("r".repeat(16)) });
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
}
