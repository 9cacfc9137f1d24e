//! The embedded store (SQLite, WAL): the desired state (assets, segments, rules), settings,
//! credentials' hashes, the Netskope integration's state (apps, mappings, pending pushes) and the
//! audit log. Every change is one transaction with its audit rows: it is recorded whole or not at all.

use std::{path::Path, sync::mpsc::Receiver};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    auth::{self, Actor, Credential, Origin, Role},
    netskope::{
        AppRecord, Integration, KEY_LAST_SUCCESS, KEY_LAST_SYNC, KEY_PUBLISHERS, KEY_SETTINGS, Settings, TOKEN_FILE,
    },
};
use crate::policy::{
    PolicyDocument,
    diff::{Change, Spec},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {error}")]
    Sqlite { path: String, error: rusqlite::Error },
    #[error("store {path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// A gated transaction ([`Store::gate_next_commit`]) told not to commit.
    #[error("store: the change was not committed, as it was not enforced")]
    Cancelled,
    /// Found at [`Store::open`]: the store was written by a newer gatekeeper.
    #[error(
        "store {path} has schema version {found}, newer than this gatekeeper's ({supported}); run the newer \
         gatekeeper, or restore a backup written by this one"
    )]
    TooNew { path: String, found: usize, supported: usize },
    /// The schema could not be read or upgraded.
    #[error("store {path}: its schema could not be upgraded: {source}")]
    Schema {
        path: String,
        #[source]
        source: Box<rusqlite_migration::Error>,
    },
    #[error("store: object {kind}/{name} is corrupt: {error}")]
    Corrupt { kind: String, name: String, error: String },
    /// Found at [`Store::open`]: the file is not an SQLite database, or `PRAGMA quick_check`
    /// found it damaged. The daemon does not start on it (and so leaves the data plane as it is).
    #[error(
        "store {path} is corrupt ({what}); gatekeeper will not start on it. Restore it from a backup, or move it \
         away together with its -wal and -shm files to start from an empty store, then apply the policy again"
    )]
    Damaged {
        path: String,
        what: String,
        #[source]
        source: Option<rusqlite::Error>,
    },
    /// Found at [`Store::open`]: the database, or the directory that must hold its -wal and -shm
    /// files, cannot be written, so every change would fail.
    #[error(
        "store {path} is not writable ({what}); gatekeeper will not start on it. Check the owner and mode of \
         the file and its directory, an immutable flag (lsattr), and whether the filesystem is mounted read-only"
    )]
    ReadOnly {
        path: String,
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StoreError {
    /// An SQLite error met while opening and checking the store at `path`: corruption and
    /// refused writes get their precise variant, anything else stays [`StoreError::Sqlite`].
    fn at_open(path: &str, what: &str, error: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        match error.sqlite_error_code() {
            Some(C::NotADatabase | C::DatabaseCorrupt) => {
                Self::Damaged { path: path.into(), what: what.into(), source: Some(error) }
            }
            Some(C::ReadOnly | C::CannotOpen | C::PermissionDenied) => {
                Self::ReadOnly { path: path.into(), what: what.into(), source: Some(Box::new(error)) }
            }
            _ => Self::Sqlite { path: path.into(), error },
        }
    }
}

/// A row of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    /// RFC 3339.
    pub at: String,
    /// The token's name for API requests; `daemon`, `netskope` or `expiry` for the daemon's own.
    pub actor: String,
    /// The client's address, for API requests.
    pub address: Option<String>,
    pub action: String,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

pub struct Store {
    conn: rusqlite::Connection,
    path: String,
    /// Decides whether the next change transaction commits ([`Store::gate_next_commit`]).
    gate: Option<Receiver<bool>>,
}

impl Store {
    /// Opens (or creates) the store at `path` and checks it before anything relies on it: a
    /// damaged database ([`StoreError::Damaged`], `PRAGMA quick_check`) or one that cannot be
    /// written ([`StoreError::ReadOnly`]: the file, its -wal/-shm files or their directory) is
    /// refused here, at start, rather than failing every later change.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let p = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|error| StoreError::Io { path: p.clone(), error })?;
        }
        check_files_writable(path, &p)?;
        let conn = rusqlite::Connection::open(path).map_err(|e| StoreError::at_open(&p, "cannot open it", e))?;
        // The store holds credentials' hashes and the audit log: owner only.
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        // A file SQLite could only open read-only (mode, owner, immutable flag, read-only mount).
        if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false) {
            return Err(StoreError::ReadOnly {
                path: p,
                what: "SQLite could open it for reading only".into(),
                source: None,
            });
        }
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(|e| StoreError::at_open(&p, "cannot read its header", e))?;
        quick_check(&conn, &p)?;
        let mut conn = conn;
        migrate(&mut conn, &p)?;
        check_writable(&conn, &p)?;
        Ok(Self { conn, path: p, gate: None })
    }

    /// Makes the next change transaction ([`Store::commit_each`], [`Store::netskope_commit`])
    /// wait, once its rows are written, for `gate`: it commits on `true` and is rolled back
    /// ([`StoreError::Cancelled`]) on `false` or when the sender is gone. The control layer
    /// writes a large change's rows while it compiles the change on another thread, and
    /// commits only what compiled.
    pub fn gate_next_commit(&mut self, gate: Receiver<bool>) {
        self.gate = Some(gate);
    }

    /// Forgets a gate no transaction used.
    pub fn clear_gate(&mut self) {
        self.gate = None;
    }

    /// The directory holding the store (and secrets kept beside it).
    pub fn dir(&self) -> std::path::PathBuf {
        Path::new(&self.path).parent().map_or_else(|| ".".into(), Path::to_path_buf)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |error| StoreError::Sqlite { path: self.path.clone(), error }
    }

    /// The desired state, objects in the order they were first stored.
    pub fn load(&self) -> Result<PolicyDocument, StoreError> {
        let mut stmt = self.conn.prepare("SELECT kind, name, spec FROM objects ORDER BY seq").map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .map_err(self.err())?;
        let mut doc = PolicyDocument::default();
        for row in rows {
            let (kind, name, spec) = row.map_err(self.err())?;
            let corrupt = |error: serde_json::Error| StoreError::Corrupt {
                kind: kind.clone(),
                name: name.clone(),
                error: error.to_string(),
            };
            match kind.as_str() {
                "asset" => doc.assets.push(serde_json::from_str(&spec).map_err(corrupt)?),
                "segment" => doc.segments.push(serde_json::from_str(&spec).map_err(corrupt)?),
                "rule" => doc.rules.push(serde_json::from_str(&spec).map_err(corrupt)?),
                _ => return Err(StoreError::Corrupt { kind, name, error: "unknown kind".into() }),
            }
        }
        Ok(doc)
    }

    /// Records `changes` and their audit rows in one transaction.
    pub fn commit(&mut self, changes: &[Change], actor: &Actor, action: &str) -> Result<(), StoreError> {
        self.write_changes(changes.iter().map(|c| (c, actor, action)))
    }

    /// Records changes made by different requests, each with its own actor and action, in one
    /// transaction (group commit).
    pub fn commit_each<A: std::borrow::Borrow<Actor>>(
        &mut self,
        changes: &[(Change, A, &str)],
    ) -> Result<(), StoreError> {
        self.write_changes(changes.iter().map(|(c, actor, action)| (c, actor.borrow(), *action)))
    }

    /// The objects of `changes` and their audit rows, in one transaction.
    fn write_changes<'a>(
        &mut self,
        changes: impl Iterator<Item = (&'a Change, &'a Actor, &'a str)>,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |error| StoreError::Sqlite { path: path.clone(), error };
        let tx = self.conn.transaction().map_err(sql)?;
        let at = chrono::Utc::now().to_rfc3339();
        // Cached statements: a reload may record 100k changes, and parsing each statement again
        // would cost more than writing the row.
        for (c, actor, action) in changes {
            // The new object is the stored spec and the audit row's `new`: serialized once.
            let new = c.new.as_ref().map(Spec::as_str);
            match &new {
                Some(v) => tx
                    .prepare_cached(
                        "INSERT INTO objects (kind, name, spec) VALUES (?1, ?2, ?3)
                         ON CONFLICT (kind, name) DO UPDATE SET spec = excluded.spec",
                    )
                    .and_then(|mut st| st.execute((c.kind.as_str(), &c.name, v)))
                    .map_err(sql)?,
                None => tx
                    .prepare_cached("DELETE FROM objects WHERE kind = ?1 AND name = ?2")
                    .and_then(|mut st| st.execute((c.kind.as_str(), &c.name)))
                    .map_err(sql)?,
            };
            let old = c.old.as_ref().map(Spec::as_str);
            audit_row(&tx, &at, actor, action, Some(c.kind.as_str()), Some(&c.name), old, new).map_err(sql)?;
        }
        finish(tx, &mut self.gate, sql)
    }

    /// The one text column `sql` selects for `key`, or `None` when no row matches.
    fn text(&self, sql: &str, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(sql, [key], |r| r.get(0))
            .map(Some)
            .or_else(|e| if matches!(e, rusqlite::Error::QueryReturnedNoRows) { Ok(None) } else { Err(e) })
            .map_err(self.err())
    }

    /// A setting (JSON), or `None` when never set.
    pub fn setting<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let text = self.text("SELECT value FROM settings WHERE key = ?1", key)?;
        text.map(|t| {
            serde_json::from_str(&t).map_err(|e| StoreError::Corrupt {
                kind: "setting".into(),
                name: key.into(),
                error: e.to_string(),
            })
        })
        .transpose()
    }

    /// Sets (or with `None` removes) a setting and records `audit` rows, in one transaction.
    pub fn set_setting<T: Serialize>(
        &mut self,
        key: &str,
        value: Option<&T>,
        audit: &[AuditRow],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |error| StoreError::Sqlite { path: path.clone(), error };
        let tx = self.conn.transaction().map_err(sql)?;
        match value {
            Some(v) => tx
                .execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, serde_json::to_string(v).unwrap_or_default()),
                )
                .map_err(sql)?,
            None => tx.execute("DELETE FROM settings WHERE key = ?1", [key]).map_err(sql)?,
        };
        insert_audit(&tx, audit).map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Replaces the hash of the token named `name` (the token itself is never stored).
    pub fn set_credential(&mut self, name: &str, role: &str, sha256: &str, source: &str) -> Result<bool, StoreError> {
        let old = self.text("SELECT role || ' ' || sha256 || ' ' || origin FROM credentials WHERE name = ?1", name)?;
        if old.as_deref() == Some(&format!("{role} {sha256} file")) {
            return Ok(false);
        }
        let at = chrono::Utc::now().to_rfc3339();
        let audit = AuditRow {
            actor: Actor::named("daemon"),
            action: if old.is_some() { "rotate credential".into() } else { "add credential".into() },
            kind: Some("credential".into()),
            name: Some(name.into()),
            old: None,
            new: Some(serde_json::json!({"role": role, "source": source})),
        };
        let path = self.path.clone();
        let sql = |error| StoreError::Sqlite { path: path.clone(), error };
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute(
            "INSERT INTO credentials (name, role, sha256, source, updated, origin)
             VALUES (?1, ?2, ?3, ?4, ?5, 'file')
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, sha256 = excluded.sha256,
             source = excluded.source, updated = excluded.updated, origin = 'file'",
            (name, role, sha256, source, &at),
        )
        .map_err(sql)?;
        insert_audit(&tx, &[audit]).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(true)
    }

    /// Removes the file tokens' credentials whose names are not in `keep` (their files are no
    /// longer configured), with an audit row each. Tokens created through the API stay.
    pub fn retain_credentials(&mut self, keep: &[&str]) -> Result<(), StoreError> {
        let gone: Vec<String> = self
            .credentials()?
            .into_iter()
            .filter(|c| c.origin == Origin::File && !keep.contains(&c.name.as_str()))
            .map(|c| c.name)
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let sql = |error| StoreError::Sqlite { path: path.clone(), error };
        let tx = self.conn.transaction().map_err(sql)?;
        for name in &gone {
            tx.execute("DELETE FROM credentials WHERE name = ?1", [name]).map_err(sql)?;
        }
        let audit: Vec<AuditRow> = gone
            .iter()
            .map(|name| AuditRow {
                actor: Actor::named("daemon"),
                action: "remove credential".into(),
                kind: Some("credential".into()),
                name: Some(name.clone()),
                ..AuditRow::default()
            })
            .collect();
        insert_audit(&tx, &audit).map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Each credential, by name.
    pub fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, role, sha256, origin FROM credentials ORDER BY name")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (name, role, sha256, origin) = row.map_err(self.err())?;
            let corrupt =
                |what: &str| StoreError::Corrupt { kind: "credential".into(), name: name.clone(), error: what.into() };
            let role = match role.as_str() {
                "admin" => Role::Admin,
                "reader" => Role::Reader,
                _ => return Err(corrupt("unknown role")),
            };
            let origin = match origin.as_str() {
                "file" => Origin::File,
                "api" => Origin::Api,
                _ => return Err(corrupt("unknown origin")),
            };
            let hash = auth::hash_from_hex(&sha256).ok_or_else(|| corrupt("not a SHA-256"))?;
            out.push(Credential { name, role, origin, hash });
        }
        Ok(out)
    }

    /// Records a token created through the API (its hash), with its audit row; refused if a
    /// token of that name exists.
    pub fn add_api_credential(&mut self, actor: &Actor, c: &Credential) -> Result<bool, StoreError> {
        let hex: String = c.hash.iter().map(|b| format!("{b:02x}")).collect();
        let path = self.path.clone();
        let sql = |error| StoreError::Sqlite { path: path.clone(), error };
        let tx = self.conn.transaction().map_err(sql)?;
        let added = tx
            .execute(
                "INSERT INTO credentials (name, role, sha256, source, updated, origin)
                 VALUES (?1, ?2, ?3, 'api', ?4, 'api') ON CONFLICT (name) DO NOTHING",
                (&c.name, c.role.as_str(), &hex, chrono::Utc::now().to_rfc3339()),
            )
            .map_err(sql)?;
        if added == 0 {
            return Ok(false);
        }
        let audit = AuditRow {
            actor: actor.clone(),
            action: "create token".into(),
            kind: Some("credential".into()),
            name: Some(c.name.clone()),
            new: Some(serde_json::json!({"role": c.role.as_str(), "origin": "api"})),
            ..AuditRow::default()
        };
        insert_audit(&tx, &[audit]).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(true)
    }

    /// Removes a token created through the API, with its audit row; `false` if there is none.
    pub fn remove_api_credential(&mut self, actor: &Actor, name: &str) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let sql = |error| StoreError::Sqlite { path: path.clone(), error };
        let tx = self.conn.transaction().map_err(sql)?;
        let removed = tx.execute("DELETE FROM credentials WHERE name = ?1 AND origin = 'api'", [name]).map_err(sql)?;
        if removed == 0 {
            return Ok(false);
        }
        let audit = AuditRow {
            actor: actor.clone(),
            action: "revoke token".into(),
            kind: Some("credential".into()),
            name: Some(name.into()),
            ..AuditRow::default()
        };
        insert_audit(&tx, &[audit]).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(true)
    }

    /// The Netskope integration's state: settings (with the token from [`TOKEN_FILE`] beside
    /// the store, when it was set through the API), apps, publishers, the last syncs; its
    /// generated objects computed.
    pub fn netskope_integration(&self) -> Result<Integration, StoreError> {
        let mut settings: Option<Settings> = self.setting(KEY_SETTINGS)?;
        if let Some(s) = settings.as_mut() {
            // Absent when the token comes from the configuration's token_file.
            s.token =
                std::fs::read_to_string(self.dir().join(TOKEN_FILE)).map(|t| t.trim().to_string()).unwrap_or_default();
        }
        let mut i = Integration {
            settings,
            apps: self.netskope_apps()?.into_iter().map(|a| (a.remote.id, a)).collect(),
            publishers: self.setting(KEY_PUBLISHERS)?.unwrap_or_default(),
            last_sync: self.setting(KEY_LAST_SYNC)?,
            last_success: self.setting(KEY_LAST_SUCCESS)?,
            ..Integration::default()
        };
        i.regenerate();
        Ok(i)
    }

    /// Every stored Netskope private app.
    pub fn netskope_apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT app_id, record FROM netskope_apps ORDER BY app_id").map_err(self.err())?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))).map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, text) = row.map_err(self.err())?;
            out.push(serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                kind: "netskope app".into(),
                name: id.to_string(),
                error: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Writes app records (and removes `removed`), marks `pending` apps for a push (the change
    /// that made them pending commits with them, so it cannot be lost) and clears pushed ones,
    /// with `audit` rows: one transaction.
    pub fn netskope_commit(&mut self, c: NetskopeCommit<'_>) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |error| StoreError::Sqlite { path: path.clone(), error };
        let tx = self.conn.transaction().map_err(sql)?;
        for r in c.records {
            tx.execute(
                "INSERT INTO netskope_apps (app_id, record) VALUES (?1, ?2)
                 ON CONFLICT (app_id) DO UPDATE SET record = excluded.record",
                (r.remote.id as i64, serde_json::to_string(r).unwrap_or_default()),
            )
            .map_err(sql)?;
        }
        for id in c.removed {
            tx.execute("DELETE FROM netskope_apps WHERE app_id = ?1", [*id as i64]).map_err(sql)?;
        }
        let at = chrono::Utc::now().to_rfc3339();
        for (id, reason) in c.pending {
            tx.execute(
                "INSERT INTO netskope_pending (app_id, seq, reason, since) VALUES (?1, 1, ?2, ?3)
                 ON CONFLICT (app_id) DO UPDATE SET seq = seq + 1,
                 reason = CASE WHEN reason = 'change' THEN excluded.reason ELSE reason END",
                (*id as i64, reason, &at),
            )
            .map_err(sql)?;
        }
        for (key, value) in c.settings {
            match value {
                Some(v) => tx.execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, v),
                ),
                None => tx.execute("DELETE FROM settings WHERE key = ?1", [key]),
            }
            .map_err(sql)?;
        }
        for (id, seq) in c.pushed {
            tx.execute("DELETE FROM netskope_pending WHERE app_id = ?1 AND seq = ?2", (*id as i64, seq))
                .map_err(sql)?;
        }
        insert_audit(&tx, c.audit).map_err(sql)?;
        finish(tx, &mut self.gate, sql)
    }

    /// Apps waiting for a push: (app id, sequence, reason), oldest first.
    pub fn netskope_pending(&self) -> Result<Vec<(u64, i64, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT app_id, seq, reason FROM netskope_pending ORDER BY since, app_id")
            .map_err(self.err())?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The newest `limit` audit rows, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, at, actor, address, action, kind, name, old, new FROM audit ORDER BY id DESC LIMIT ?1")
            .map_err(self.err())?;
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    address: r.get(3)?,
                    action: r.get(4)?,
                    kind: r.get(5)?,
                    name: r.get(6)?,
                    old: json(r.get(7)?),
                    new: json(r.get(8)?),
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

/// The store's directory accepts new files (SQLite creates the -wal and -shm files beside the
/// database on every open, and removes them at close), and the -wal and -shm files that exist
/// can be written. Checked before SQLite opens anything, so the error names the real cause.
fn check_files_writable(path: &Path, p: &str) -> Result<(), StoreError> {
    let read_only = |what: String, error: std::io::Error| StoreError::ReadOnly {
        path: p.into(),
        what,
        source: Some(Box::new(error)),
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
    let probe = dir.join(format!(".{name}.write-check-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Left by a crashed start of this very pid (reused): the directory is writable enough.
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) => {
            return Err(read_only(format!("cannot create files in {} for its -wal and -shm files", dir.display()), e));
        }
    }
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = std::path::PathBuf::from(side);
        match std::fs::OpenOptions::new().write(true).open(&side) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(read_only(format!("cannot write {}", side.display()), e)),
        }
    }
    Ok(())
}

/// `PRAGMA quick_check`: every page, cell and record of the database is well-formed (without
/// the index contents check of `integrity_check`, which takes much longer on a large store).
fn quick_check(conn: &rusqlite::Connection, p: &str) -> Result<(), StoreError> {
    /// Problems quoted in the error; the rest are counted.
    const SHOWN: usize = 3;
    let what = "PRAGMA quick_check failed";
    let mut stmt = conn.prepare("PRAGMA quick_check").map_err(|e| StoreError::at_open(p, what, e))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(|e| StoreError::at_open(p, what, e))?;
    let problems: Vec<String> = rows.collect::<Result<_, _>>().map_err(|e| StoreError::at_open(p, what, e))?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    let mut what =
        format!("PRAGMA quick_check: {}", problems.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; "));
    if problems.len() > SHOWN {
        what.push_str(&format!("; and {} more problem(s)", problems.len() - SHOWN));
    }
    Err(StoreError::Damaged { path: p.into(), what, source: None })
}

/// The database takes a write: a write transaction (`BEGIN IMMEDIATE`, which takes the write
/// lock) with one row written, then rolled back, so nothing is stored.
fn check_writable(conn: &rusqlite::Connection, p: &str) -> Result<(), StoreError> {
    let what = "a test write was refused";
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         INSERT INTO settings (key, value) VALUES ('gatekeeper.write-check', 'null')
             ON CONFLICT (key) DO UPDATE SET value = excluded.value;",
    )
    .map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        StoreError::at_open(p, what, e)
    })?;
    conn.execute_batch("ROLLBACK").map_err(|e| StoreError::at_open(p, what, e))
}

/// An audit row not tied to a policy object change (pushes, settings, credentials).
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub actor: Actor,
    pub action: String,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

impl Default for AuditRow {
    fn default() -> Self {
        Self { actor: Actor::named("daemon"), action: String::new(), kind: None, name: None, old: None, new: None }
    }
}

/// One Netskope state transaction (see [`Store::netskope_commit`]).
#[derive(Default)]
pub struct NetskopeCommit<'a> {
    pub records: &'a [AppRecord],
    /// Apps whose records are removed.
    pub removed: &'a [u64],
    /// Apps to push, with why: `change` (membership or mapping), `sync` or `start` (always read
    /// the app, to correct drift).
    pub pending: &'a [(u64, &'a str)],
    /// Pushed apps with the pending sequence they covered (a newer mark stays).
    pub pushed: &'a [(u64, i64)],
    pub audit: &'a [AuditRow],
    /// Settings to set (JSON text) or remove, in the same transaction.
    pub settings: &'a [(&'a str, Option<String>)],
}

fn insert_audit(tx: &rusqlite::Transaction<'_>, rows: &[AuditRow]) -> rusqlite::Result<()> {
    let at = chrono::Utc::now().to_rfc3339();
    for r in rows {
        let (old, new) = (r.old.as_ref().map(Value::to_string), r.new.as_ref().map(Value::to_string));
        audit_row(tx, &at, &r.actor, &r.action, r.kind.as_deref(), r.name.as_deref(), old.as_deref(), new.as_deref())?;
    }
    Ok(())
}

/// Commits `tx`, unless a gate ([`Store::gate_next_commit`]) says not to.
fn finish(
    tx: rusqlite::Transaction<'_>,
    gate: &mut Option<Receiver<bool>>,
    sql: impl FnOnce(rusqlite::Error) -> StoreError,
) -> Result<(), StoreError> {
    if let Some(g) = gate.take()
        && !g.recv().unwrap_or(false)
    {
        // Dropping the transaction rolls it back.
        return Err(StoreError::Cancelled);
    }
    tx.commit().map_err(sql)
}

/// The one statement that writes the audit log.
#[allow(clippy::too_many_arguments)]
fn audit_row(
    tx: &rusqlite::Transaction<'_>,
    at: &str,
    actor: &Actor,
    action: &str,
    kind: Option<&str>,
    name: Option<&str>,
    old: Option<&str>,
    new: Option<&str>,
) -> rusqlite::Result<()> {
    let address = actor.address.map(|a| a.to_string());
    tx.prepare_cached(
        "INSERT INTO audit (at, actor, address, action, kind, name, old, new)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute((at, &actor.name, address, action, kind, name, old, new))
    .map(|_| ())
}

/// The store's schema, one step per version (`PRAGMA user_version`): a store written by an
/// older gatekeeper is upgraded in place when opened, one written by a newer one is refused.
/// Steps are only ever appended; a released step never changes.
fn migrations() -> rusqlite_migration::Migrations<'static> {
    use rusqlite_migration::M;
    rusqlite_migration::Migrations::new(vec![
        // 1: the schema before versioning (stores of that time have user_version 0 and these
        // tables already: hence IF NOT EXISTS).
        M::up(
            "CREATE TABLE IF NOT EXISTS objects (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 kind TEXT NOT NULL,
                 name TEXT NOT NULL,
                 spec TEXT NOT NULL,
                 UNIQUE (kind, name));
             CREATE TABLE IF NOT EXISTS audit (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 at TEXT NOT NULL,
                 actor TEXT NOT NULL,
                 action TEXT NOT NULL,
                 kind TEXT, name TEXT, old TEXT, new TEXT);
             CREATE TABLE IF NOT EXISTS settings (
                 key TEXT PRIMARY KEY,
                 value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS credentials (
                 role TEXT PRIMARY KEY,
                 sha256 TEXT NOT NULL,
                 source TEXT NOT NULL,
                 updated TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS netskope_apps (
                 app_id INTEGER PRIMARY KEY,
                 record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS netskope_pending (
                 app_id INTEGER PRIMARY KEY,
                 seq INTEGER NOT NULL,
                 reason TEXT NOT NULL,
                 since TEXT NOT NULL);",
        ),
        // 2: named tokens (the two roles' tokens keep their role as name) and the client's
        // address in the audit log.
        M::up(
            "CREATE TABLE credentials_named (
                 name TEXT PRIMARY KEY,
                 role TEXT NOT NULL,
                 sha256 TEXT NOT NULL,
                 source TEXT NOT NULL,
                 updated TEXT NOT NULL);
             INSERT INTO credentials_named (name, role, sha256, source, updated)
                 SELECT role, role, sha256, source, updated FROM credentials;
             DROP TABLE credentials;
             ALTER TABLE credentials_named RENAME TO credentials;
             ALTER TABLE audit ADD COLUMN address TEXT;",
        ),
        // 3: tokens created through the API (only their hash exists) beside those from files.
        M::up("ALTER TABLE credentials ADD COLUMN origin TEXT NOT NULL DEFAULT 'file';"),
    ])
}

/// The schema version this gatekeeper writes.
pub const SCHEMA_VERSION: usize = 3;

fn migrate(conn: &mut rusqlite::Connection, p: &str) -> Result<(), StoreError> {
    use rusqlite_migration::{Error as E, MigrationDefinitionError as D, SchemaVersion};
    let m = migrations();
    let found = m.current_version(conn).map_err(|e| StoreError::Schema { path: p.into(), source: Box::new(e) })?;
    if let SchemaVersion::Outside(v) = found {
        return Err(StoreError::TooNew { path: p.into(), found: v.get(), supported: SCHEMA_VERSION });
    }
    m.to_latest(conn).map_err(|e| match e {
        E::MigrationDefinition(D::DatabaseTooFarAhead) => {
            StoreError::TooNew { path: p.into(), found: 0, supported: SCHEMA_VERSION }
        }
        E::RusqliteError { query: _, err } => StoreError::at_open(p, "cannot upgrade its schema", err),
        e => StoreError::Schema { path: p.into(), source: Box::new(e) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::diff::changes;

    fn doc(yaml: &str) -> PolicyDocument {
        PolicyDocument::from_yaml(yaml, "t").unwrap()
    }

    #[test]
    fn commits_survive_reopening_and_keep_order() {
        let dir = std::env::temp_dir().join(format!("gk-store-{}", std::process::id()));
        let path = dir.join("state.db");
        let _ = std::fs::remove_dir_all(&dir);
        let a = doc(
            "assets:\n  - {name: b, ips: [10.0.0.2]}\n  - {name: a, ips: [10.0.0.1], tags: {role: plc}}\nrules:\n  - {name: r2, from: any, to: any}\n  - {name: r1, from: any, to: any}\n",
        );
        {
            let mut s = Store::open(&path).unwrap();
            s.commit(&changes(&PolicyDocument::default(), &a), &"test".into(), "apply").unwrap();
        }
        let mode = std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap();
        assert_eq!(mode, 0o600);
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.load().unwrap(), a, "same objects, same order");
        let b = doc(
            "assets:\n  - {name: b, ips: [10.0.0.2]}\n  - {name: a, ips: [10.0.0.1], tags: {role: hmi}}\nrules:\n  - {name: r2, from: any, to: any}\n",
        );
        let c = changes(&a, &b);
        assert_eq!(c.len(), 2, "{c:?}");
        s.commit(&c, &Actor { name: "alice".into(), address: Some("192.0.2.7".parse().unwrap()) }, "put").unwrap();
        assert_eq!(s.load().unwrap(), b);
        let audit = s.audit(10).unwrap();
        assert_eq!(audit[0].actor, "alice");
        assert_eq!(audit[0].address.as_deref(), Some("192.0.2.7"));
        assert_eq!(audit[0].name.as_deref(), Some("r1"));
        assert!(audit[0].new.is_none() && audit[0].old.is_some());
        assert_eq!(audit[1].new.as_ref().unwrap()["tags"]["role"], "hmi");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store written before the schema was versioned (user_version 0, credentials keyed by
    /// role, no audit address) opens, keeps everything, and is upgraded in place; a store from
    /// a newer gatekeeper is refused.
    #[test]
    fn a_store_of_the_previous_schema_is_upgraded() {
        let dir = std::env::temp_dir().join(format!("gk-store-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        {
            let old = rusqlite::Connection::open(&path).unwrap();
            // The tables exactly as gatekeeper created them before schema versions.
            old.execute_batch(
                "CREATE TABLE objects (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
                     name TEXT NOT NULL, spec TEXT NOT NULL, UNIQUE (kind, name));
                 CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL,
                     actor TEXT NOT NULL, action TEXT NOT NULL, kind TEXT, name TEXT, old TEXT, new TEXT);
                 CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE credentials (role TEXT PRIMARY KEY, sha256 TEXT NOT NULL,
                     source TEXT NOT NULL, updated TEXT NOT NULL);
                 CREATE TABLE netskope_apps (app_id INTEGER PRIMARY KEY, record TEXT NOT NULL);
                 CREATE TABLE netskope_pending (app_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL,
                     reason TEXT NOT NULL, since TEXT NOT NULL);
                 INSERT INTO objects (kind, name, spec) VALUES
                     ('asset', 'plc-1', '{\"name\":\"plc-1\",\"ips\":[\"10.0.0.11\"],\"tags\":{\"role\":\"plc\"}}');
                 INSERT INTO audit (at, actor, action, kind, name, old, new) VALUES
                     ('2026-11-01T00:00:00+00:00', 'admin', 'put asset', 'asset', 'plc-1', NULL, '{}');
                 INSERT INTO credentials (role, sha256, source, updated) VALUES
                     ('admin', 'abababababababababababababababababababababababababababababababab',
                      '/etc/gatekeeper/admin.token', '2026-11-01T00:00:00+00:00');",
            )
            .unwrap();
        }
        let mut s = Store::open(&path).expect("the old store opens");
        let doc = s.load().unwrap();
        assert_eq!(doc.assets.len(), 1);
        assert_eq!(doc.assets[0].name, "plc-1");
        let audit = s.audit(10).unwrap();
        assert_eq!((audit[0].actor.as_str(), audit[0].address.as_deref()), ("admin", None));
        let creds = s.credentials().unwrap();
        assert_eq!(creds.len(), 1);
        assert_eq!((creds[0].name.as_str(), creds[0].role, creds[0].origin), ("admin", Role::Admin, Origin::File));
        assert_eq!(creds[0].hash, auth::hash_from_hex(&"ab".repeat(32)).unwrap());
        let version: usize = s.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // The upgraded store takes new rows with addresses, and named credentials.
        let alice = Actor { name: "alice".into(), address: Some("192.0.2.9".parse().unwrap()) };
        s.commit(&changes(&doc, &PolicyDocument::default()), &alice, "apply").unwrap();
        assert_eq!(s.audit(1).unwrap()[0].address.as_deref(), Some("192.0.2.9"));
        assert!(s.set_credential("alice", "admin", &"cd".repeat(32), "/etc/gatekeeper/alice.token").unwrap());
        let bob = Credential { name: "bob".into(), role: Role::Reader, origin: Origin::Api, hash: [7; 32] };
        assert!(s.add_api_credential(&alice, &bob).unwrap());
        assert!(!s.add_api_credential(&alice, &bob).unwrap(), "a name is taken once");
        s.retain_credentials(&["alice"]).unwrap();
        let names: Vec<_> = s.credentials().unwrap().into_iter().map(|c| (c.name, c.origin)).collect();
        assert_eq!(names, [("alice".to_string(), Origin::File), ("bob".to_string(), Origin::Api)], "API tokens stay");
        drop(s);
        // Opening again changes nothing.
        assert_eq!(Store::open(&path).unwrap().audit(100).unwrap().len(), audit.len() + 4);

        // A store of a newer schema is refused, untouched.
        rusqlite::Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
        match Store::open(&path) {
            Err(e @ StoreError::TooNew { found: 99, .. }) => assert!(e.to_string().contains("newer"), "{e}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a store of schema 99 opened"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
