//! API key authentication: `Authorization: Bearer <key>`, checked in constant time against
//! every configured key.
//!
//! Keys come from `auth.api_keys` in the config and from `auth.api_keys_file` (one `name:key`
//! or bare key per line; `#` comments and blank lines ignored; a bare key on line N is named
//! `key-N`).

use std::fmt;
use std::path::Path;

use crate::config::{AuthConfig, ConfigError};

/// Name reported for requests when authentication is disabled.
pub const ANONYMOUS: &str = "anonymous";

/// Why a request was not authenticated. The messages suit a 401 JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing API key: send it as `Authorization: Bearer <key>`")]
    Missing,
    /// The header is not `Bearer <key>`.
    #[error("malformed Authorization header: expected `Bearer <key>`")]
    Malformed,
    /// The key matches no configured key.
    #[error("invalid API key")]
    Invalid,
}

impl AuthError {
    /// A stable machine-readable code: `missing_api_key`, `malformed_authorization` or
    /// `invalid_api_key`.
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_api_key",
            AuthError::Malformed => "malformed_authorization",
            AuthError::Invalid => "invalid_api_key",
        }
    }
}

struct Key {
    name: String,
    secret: Vec<u8>,
}

/// The configured API keys and open paths. `Debug` shows names only.
pub struct ApiKeys {
    enabled: bool,
    keys: Vec<Key>,
    open_paths: Vec<String>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|k| k.name.as_str()).collect();
        f.debug_struct("ApiKeys")
            .field("enabled", &self.enabled)
            .field("keys", &names)
            .field("open_paths", &self.open_paths)
            .finish()
    }
}

impl ApiKeys {
    /// Collects the keys of the `auth` section, reading `api_keys_file` when auth is enabled.
    /// Refuses empty or duplicate names and keys, keys with whitespace, and an enabled
    /// section without any key.
    pub fn from_config(cfg: &AuthConfig) -> Result<ApiKeys, ConfigError> {
        let mut keys = Vec::new();
        if cfg.enabled {
            for (i, entry) in cfg.api_keys.iter().enumerate() {
                let at = |field: &str| format!("auth.api_keys[{i}].{field}");
                check_name(&entry.name).map_err(|m| invalid(format!("{} {m}", at("name"))))?;
                check_secret(&entry.key).map_err(|m| invalid(format!("{} {m}", at("key"))))?;
                keys.push(Key {
                    name: entry.name.clone(),
                    secret: entry.key.as_bytes().to_vec(),
                });
            }
            if let Some(path) = &cfg.api_keys_file {
                keys.extend(read_key_file(path)?);
            }
            check_unique(&keys)?;
            if keys.is_empty() {
                return Err(invalid(
                    "auth.enabled is true but no API key is configured".to_string(),
                ));
            }
        }
        Ok(ApiKeys {
            enabled: cfg.enabled,
            keys,
            open_paths: cfg.open_paths.clone(),
        })
    }

    /// Whether requests need a key.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Number of configured keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `path` (exactly, without query) is served without a key.
    pub fn is_open_path(&self, path: &str) -> bool {
        self.open_paths.iter().any(|open| open == path)
    }

    /// Checks an `Authorization` header value and returns the matching key's name
    /// ([`ANONYMOUS`] when authentication is disabled).
    ///
    /// The presented key is compared with every configured key, each in constant time.
    pub fn authenticate(&self, authorization_header: Option<&str>) -> Result<&str, AuthError> {
        if !self.enabled {
            return Ok(ANONYMOUS);
        }
        let header = authorization_header.ok_or(AuthError::Missing)?;
        let presented = bearer_token(header).ok_or(AuthError::Malformed)?;
        let mut matched: Option<&str> = None;
        for key in &self.keys {
            let equal = constant_time_eq(presented.as_bytes(), &key.secret);
            if equal && matched.is_none() {
                matched = Some(&key.name);
            }
        }
        matched.ok_or(AuthError::Invalid)
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, surrounding spaces allowed).
fn bearer_token(header: &str) -> Option<&str> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(|c: char| c.is_ascii_whitespace())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    let well_formed = !token.is_empty() && !token.chars().any(|c| c.is_whitespace());
    well_formed.then_some(token)
}

/// Compares `given` with `expected` without stopping at the first difference: the time taken
/// depends only on `given.len()`, never on where the inputs differ or on `expected`'s length.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    let n = expected.len();
    for (i, &g) in given.iter().enumerate() {
        // When `expected` is empty the length check alone decides; read a zero byte instead.
        let e = if n == 0 { 0 } else { expected[i % n] };
        diff |= usize::from(g ^ e);
    }
    std::hint::black_box(diff) == 0
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(vec![message])
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() {
        Err("must not be empty")
    } else {
        Ok(())
    }
}

fn check_secret(secret: &str) -> Result<(), &'static str> {
    if secret.is_empty() {
        Err("must not be empty")
    } else if secret.chars().any(char::is_whitespace) {
        Err("must not contain whitespace")
    } else {
        Ok(())
    }
}

fn check_unique(keys: &[Key]) -> Result<(), ConfigError> {
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            if a.name == b.name {
                return Err(invalid(format!("duplicate API key name `{}`", a.name)));
            }
            if a.secret == b.secret {
                return Err(invalid(format!(
                    "API keys `{}` and `{}` are the same key",
                    a.name, b.name
                )));
            }
        }
    }
    Ok(())
}

fn read_key_file(path: &Path) -> Result<Vec<Key>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut keys = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let key = parse_key_line(raw, line).map_err(|message| ConfigError::KeyFile {
            path: path.to_path_buf(),
            line,
            message,
        })?;
        keys.extend(key);
    }
    Ok(keys)
}

/// One line of a keys file: `None` for blank lines and comments.
fn parse_key_line(raw: &str, line: usize) -> Result<Option<Key>, String> {
    let text = raw.trim();
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let (name, secret) = match text.split_once(':') {
        Some((name, secret)) => (name.trim().to_string(), secret.trim()),
        None => (format!("key-{line}"), text),
    };
    if name.is_empty() {
        return Err("key name before `:` must not be empty".to_string());
    }
    check_secret(secret).map_err(|m| format!("key {m}"))?;
    Ok(Some(Key {
        name,
        secret: secret.as_bytes().to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyEntry;
    use std::path::PathBuf;

    fn entry(name: &str, key: &str) -> ApiKeyEntry {
        ApiKeyEntry {
            name: name.to_string(),
            key: key.to_string(),
        }
    }

    fn enabled_with(keys: Vec<ApiKeyEntry>) -> AuthConfig {
        AuthConfig {
            enabled: true,
            api_keys: keys,
            ..AuthConfig::default()
        }
    }

    fn keys(cfg: &AuthConfig) -> ApiKeys {
        match ApiKeys::from_config(cfg) {
            Ok(k) => k,
            Err(e) => panic!("from_config failed: {e}"),
        }
    }

    fn config_error(cfg: &AuthConfig) -> String {
        match ApiKeys::from_config(cfg) {
            Ok(k) => panic!("expected an error, got {k:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// A scratch file, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("cllm-auth-{}-{name}", std::process::id()));
            assert!(std::fs::write(&path, contents).is_ok());
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn constant_time_eq_is_correct() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"Secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
        assert!(!constant_time_eq(b"secrets", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
        // A repetition of the key must not match (the index wraps around `expected`).
        assert!(!constant_time_eq(b"abab", b"ab"));
    }

    #[test]
    fn valid_bearer_key_returns_its_name() {
        let k = keys(&enabled_with(vec![
            entry("alice", "k-alice"),
            entry("bob", "k-bob"),
        ]));
        assert!(k.enabled());
        assert_eq!(k.len(), 2);
        assert_eq!(k.authenticate(Some("Bearer k-alice")), Ok("alice"));
        assert_eq!(k.authenticate(Some("Bearer k-bob")), Ok("bob"));
        assert_eq!(k.authenticate(Some("bearer k-bob")), Ok("bob"));
        assert_eq!(k.authenticate(Some("BEARER   k-bob  ")), Ok("bob"));
    }

    #[test]
    fn missing_malformed_and_invalid_are_distinguished() {
        let k = keys(&enabled_with(vec![entry("alice", "k-alice")]));
        assert_eq!(k.authenticate(None), Err(AuthError::Missing));
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Basic k-alice",
            "k-alice",
            "Bearer a b",
        ] {
            assert_eq!(
                k.authenticate(Some(bad)),
                Err(AuthError::Malformed),
                "{bad:?}"
            );
        }
        for wrong in [
            "Bearer k-alicE",
            "Bearer k-alice2",
            "Bearer k-ali",
            "Bearer x",
        ] {
            assert_eq!(
                k.authenticate(Some(wrong)),
                Err(AuthError::Invalid),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn error_messages_and_codes() {
        assert!(AuthError::Missing.to_string().contains("Bearer"));
        assert!(AuthError::Malformed.to_string().contains("Bearer <key>"));
        assert_eq!(AuthError::Invalid.to_string(), "invalid API key");
        assert_eq!(AuthError::Invalid.code(), "invalid_api_key");
        assert_eq!(AuthError::Missing.code(), "missing_api_key");
    }

    #[test]
    fn disabled_admits_everyone() {
        let k = keys(&AuthConfig::default());
        assert!(!k.enabled());
        assert_eq!(k.authenticate(None), Ok(ANONYMOUS));
        assert_eq!(k.authenticate(Some("garbage")), Ok(ANONYMOUS));
    }

    #[test]
    fn disabled_does_not_read_the_key_file() {
        let cfg = AuthConfig {
            api_keys_file: Some(PathBuf::from("/nonexistent/cllm/keys")),
            ..AuthConfig::default()
        };
        assert!(ApiKeys::from_config(&cfg).is_ok());
    }

    #[test]
    fn open_paths_match_exactly() {
        let k = keys(&AuthConfig::default());
        assert!(k.is_open_path("/health/live"));
        assert!(k.is_open_path("/metrics"));
        assert!(!k.is_open_path("/metrics/x"));
        assert!(!k.is_open_path("/v1/completions"));
        assert!(!k.is_open_path("/health"));
    }

    #[test]
    fn enabled_without_keys_is_refused() {
        let msg = config_error(&enabled_with(vec![]));
        assert!(msg.contains("no API key is configured"), "{msg}");
    }

    #[test]
    fn bad_inline_keys_are_refused() {
        let msg = config_error(&enabled_with(vec![entry("", "k")]));
        assert!(msg.contains("auth.api_keys[0].name"), "{msg}");
        let msg = config_error(&enabled_with(vec![
            entry("a", "k"),
            entry("b", "has space"),
        ]));
        assert!(msg.contains("auth.api_keys[1].key"), "{msg}");
        let msg = config_error(&enabled_with(vec![entry("a", "k1"), entry("a", "k2")]));
        assert!(msg.contains("duplicate API key name `a`"), "{msg}");
        let msg = config_error(&enabled_with(vec![entry("a", "k"), entry("b", "k")]));
        assert!(msg.contains("same key"), "{msg}");
    }

    #[test]
    fn key_file_is_read() {
        let file = TempFile::new(
            "good",
            "# team keys\n\nalice: key-a\n  bob:key-b  \nbare-secret\n# end\n",
        );
        let cfg = AuthConfig {
            enabled: true,
            api_keys: vec![entry("inline", "key-i")],
            api_keys_file: Some(file.0.clone()),
            ..AuthConfig::default()
        };
        let k = keys(&cfg);
        assert_eq!(k.len(), 4);
        assert_eq!(k.authenticate(Some("Bearer key-a")), Ok("alice"));
        assert_eq!(k.authenticate(Some("Bearer key-b")), Ok("bob"));
        assert_eq!(k.authenticate(Some("Bearer bare-secret")), Ok("key-5"));
        assert_eq!(k.authenticate(Some("Bearer key-i")), Ok("inline"));
        let debug = format!("{k:?}");
        assert!(
            debug.contains("alice") && !debug.contains("key-a"),
            "{debug}"
        );
    }

    #[test]
    fn key_file_errors_name_file_and_line() {
        let file = TempFile::new("bad", "alice:key-a\n\n:nokey-name\n");
        let cfg = AuthConfig {
            enabled: true,
            api_keys_file: Some(file.0.clone()),
            ..AuthConfig::default()
        };
        let msg = config_error(&cfg);
        assert!(msg.contains(&format!("{}:3:", file.0.display())), "{msg}");
        assert!(msg.contains("name"), "{msg}");

        let file = TempFile::new("empty-key", "alice:\n");
        let cfg = AuthConfig {
            api_keys_file: Some(file.0.clone()),
            ..cfg
        };
        let msg = config_error(&cfg);
        assert!(
            msg.contains(":1:") && msg.contains("must not be empty"),
            "{msg}"
        );
    }

    #[test]
    fn missing_key_file_is_named() {
        let cfg = AuthConfig {
            enabled: true,
            api_keys_file: Some(PathBuf::from("/nonexistent/cllm/keys.txt")),
            ..AuthConfig::default()
        };
        let msg = config_error(&cfg);
        assert!(msg.contains("/nonexistent/cllm/keys.txt"), "{msg}");
    }

    #[test]
    fn empty_key_file_alone_is_refused() {
        let file = TempFile::new("only-comments", "# nothing\n\n");
        let cfg = AuthConfig {
            enabled: true,
            api_keys_file: Some(file.0.clone()),
            ..AuthConfig::default()
        };
        assert!(config_error(&cfg).contains("no API key is configured"));
    }
}
