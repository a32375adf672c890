//! The embedded sled backend: one sled tree per tenant, plus the directory and tenant registry trees.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::records::{
    decode, encode, DirectoryRecord, InstallationRecord, MemberRecord, TenantRecord,
};
use super::{
    Backend, DirectoryEntry, EventRepo, InstallationRepo, MembershipRepo, Result, SettingsRepo,
    StoreError, TenantRepos, TenantSummary, ToolGrantRepo,
};
use crate::crypto::Cipher;
use crate::installation::{Installation, InstallationId};
use crate::tenant::{PrincipalId, Role, TenantId, TenantSettings, ToolGrant};

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

const DIRECTORY_TREE: &str = "directory";
const TENANTS_TREE: &str = "tenants";

/// The sled-backed store.
pub struct Embedded {
    db: sled::Db,
    directory: sled::Tree,
    tenants: sled::Tree,
    cipher: Cipher,
}

impl Embedded {
    /// Opens or creates the database in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when sled cannot open it (missing permissions, held by another process).
    pub fn open(dir: &Path, cipher: Cipher) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir.join("store"))
            .open()
            .map_err(engine)?;
        Ok(Embedded {
            directory: db.open_tree(DIRECTORY_TREE).map_err(engine)?,
            tenants: db.open_tree(TENANTS_TREE).map_err(engine)?,
            db,
            cipher,
        })
    }
}

impl Backend for Embedded {
    fn tenant(&self, tenant: &TenantId) -> Result<Arc<dyn TenantRepos>> {
        let tree = self
            .db
            .open_tree(format!("tenant/{tenant}"))
            .map_err(engine)?;
        Ok(Arc::new(SledTenant {
            prefix: format!("{tenant}/"),
            tenant: tenant.clone(),
            tree,
            cipher: self.cipher.clone(),
        }))
    }

    fn lookup(&self, directory_key: &str) -> Result<Option<DirectoryEntry>> {
        match self.directory.get(directory_key).map_err(engine)? {
            None => Ok(None),
            Some(bytes) => {
                let rec: DirectoryRecord = decode(directory_key.as_bytes(), &bytes)?;
                rec.into_entry(directory_key).map(Some)
            }
        }
    }

    fn bind(
        &self,
        directory_key: &str,
        entry: &DirectoryEntry,
        summary: &TenantSummary,
    ) -> Result<()> {
        let dir_bytes = encode(&DirectoryRecord::from_entry(entry));
        let tenant_bytes = encode(&TenantRecord::from_summary(summary));
        let tenant_key = summary.id.to_string();
        let res = (&self.directory, &self.tenants).transaction(|(dir, tenants)| {
            if let Some(existing) = dir.get(directory_key)? {
                let rec: DirectoryRecord = serde_json::from_slice(&existing)
                    .map_err(|_| ConflictableTransactionError::Abort(()))?;
                let same = DirectoryRecord::from_entry(entry);
                if encode(&rec) != encode(&same) {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            dir.insert(directory_key.as_bytes(), dir_bytes.as_slice())?;
            if tenants.get(tenant_key.as_bytes())?.is_none() {
                tenants.insert(tenant_key.as_bytes(), tenant_bytes.as_slice())?;
            }
            Ok(())
        });
        match res {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => {
                Err(StoreError::WorkspaceTaken(directory_key.to_owned()))
            }
            Err(TransactionError::Storage(e)) => Err(engine(e)),
        }
    }

    fn tenants(&self) -> Result<Vec<TenantSummary>> {
        self.tenants
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(engine)?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let rec: TenantRecord = decode(&k, &v)?;
                rec.into_summary(&key)
            })
            .collect()
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(engine)
    }
}

/// A versioned wrapper for records that are plain serde values.
#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    v: u32,
    value: T,
}

/// One tenant's repositories over its own sled tree.
struct SledTenant {
    tenant: TenantId,
    /// `t_…/`: every key starts with it, so that a record names its tenant even outside its tree.
    prefix: String,
    tree: sled::Tree,
    cipher: Cipher,
}

impl SledTenant {
    fn key(&self, kind: &str, rest: &str) -> String {
        format!("{}{kind}/{rest}", self.prefix)
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        self.tree
            .get(key)
            .map_err(engine)?
            .map(|bytes| decode(key.as_bytes(), &bytes))
            .transpose()
    }

    fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<Option<sled::IVec>> {
        self.tree.insert(key, bytes).map_err(engine)
    }

    fn scan(&self, kind: &str) -> impl Iterator<Item = Result<(String, sled::IVec)>> + '_ {
        let prefix = self.key(kind, "");
        let strip = prefix.len();
        self.tree.scan_prefix(prefix.as_bytes()).map(move |kv| {
            let (k, v) = kv.map_err(engine)?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let rest = key.get(strip..).unwrap_or_default().to_owned();
            Ok((rest, v))
        })
    }
}

impl TenantRepos for SledTenant {}

impl SettingsRepo for SledTenant {
    fn get(&self) -> Result<Option<TenantSettings>> {
        Ok(self
            .get_json::<Versioned<TenantSettings>>(&self.key("settings", "current"))?
            .map(|r| r.value))
    }

    fn put(&self, settings: &TenantSettings) -> Result<()> {
        let rec = Versioned {
            v: 1,
            value: settings,
        };
        self.put_bytes(&self.key("settings", "current"), encode(&rec))?;
        Ok(())
    }
}

impl MembershipRepo for SledTenant {
    fn role_of(&self, principal: &PrincipalId) -> Result<Option<Role>> {
        Ok(self
            .get_json::<MemberRecord>(&self.key("member", principal.as_str()))?
            .map(|r| r.role))
    }

    fn set_role(&self, principal: &PrincipalId, role: Role) -> Result<Option<Role>> {
        let key = self.key("member", principal.as_str());
        let old = self.put_bytes(&key, encode(&MemberRecord { v: 1, role }))?;
        old.map(|b| decode::<MemberRecord>(key.as_bytes(), &b).map(|r| r.role))
            .transpose()
    }

    fn remove(&self, principal: &PrincipalId) -> Result<Option<Role>> {
        let key = self.key("member", principal.as_str());
        let old = self.tree.remove(&key).map_err(engine)?;
        old.map(|b| decode::<MemberRecord>(key.as_bytes(), &b).map(|r| r.role))
            .transpose()
    }

    fn list(&self) -> Result<Vec<(PrincipalId, Role)>> {
        self.scan("member")
            .map(|kv| {
                let (rest, v) = kv?;
                let principal =
                    rest.parse()
                        .map_err(|e: crate::tenant::IdError| StoreError::Corrupt {
                            key: self.key("member", &rest),
                            why: e.to_string(),
                        })?;
                let rec: MemberRecord = decode(rest.as_bytes(), &v)?;
                Ok((principal, rec.role))
            })
            .collect()
    }
}

impl InstallationRepo for SledTenant {
    fn get(&self, id: &InstallationId) -> Result<Option<Installation>> {
        let key = self.key("installation", id.as_str());
        self.get_json::<InstallationRecord>(&key)?
            .map(|rec| rec.open(&key, &self.cipher))
            .transpose()
    }

    fn put(&self, installation: &Installation) -> Result<()> {
        assert_eq!(
            installation.tenant, self.tenant,
            "an installation record was written through another tenant's repository"
        );
        let key = self.key("installation", installation.id.as_str());
        self.put_bytes(
            &key,
            encode(&InstallationRecord::seal(installation, &self.cipher)),
        )?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<Installation>> {
        self.scan("installation")
            .map(|kv| {
                let (rest, v) = kv?;
                let key = self.key("installation", &rest);
                let rec: InstallationRecord = decode(key.as_bytes(), &v)?;
                rec.open(&key, &self.cipher)
            })
            .collect()
    }
}

impl ToolGrantRepo for SledTenant {
    fn list(&self) -> Result<Vec<ToolGrant>> {
        self.scan("grant")
            .map(|kv| {
                let (rest, v) = kv?;
                let rec: Versioned<ToolGrant> = decode(self.key("grant", &rest).as_bytes(), &v)?;
                Ok(rec.value)
            })
            .collect()
    }

    fn put(&self, grant: &ToolGrant) -> Result<()> {
        let rec = Versioned { v: 1, value: grant };
        self.put_bytes(&self.key("grant", &grant.capability), encode(&rec))?;
        Ok(())
    }

    fn remove(&self, capability: &str) -> Result<bool> {
        Ok(self
            .tree
            .remove(self.key("grant", capability))
            .map_err(engine)?
            .is_some())
    }
}

impl EventRepo for SledTenant {
    fn append(&self, encode_at: &dyn Fn(u64) -> Vec<u8>) -> Result<u64> {
        let head_key = self.key("event-head", "next");
        // The head and the event go in one transaction so that two appends never share a number.
        let res = self.tree.transaction(|tx| {
            let next = match tx.get(head_key.as_bytes())? {
                Some(b) if b.len() == 8 => {
                    u64::from_be_bytes(b.as_ref().try_into().expect("length checked"))
                }
                Some(_) => return Err(ConflictableTransactionError::Abort(())),
                None => 0,
            };
            let bytes = encode_at(next);
            let event_key = format!("{}{:020}", self.key("event", ""), next);
            tx.insert(event_key.as_bytes(), bytes)?;
            tx.insert(head_key.as_bytes(), &(next + 1).to_be_bytes())?;
            Ok(next)
        });
        match res {
            Ok(seq) => Ok(seq),
            Err(TransactionError::Abort(())) => Err(StoreError::Corrupt {
                key: head_key,
                why: "the event head is not 8 bytes".into(),
            }),
            Err(TransactionError::Storage(e)) => Err(engine(e)),
        }
    }

    fn list(&self) -> Result<Vec<Vec<u8>>> {
        self.scan("event").map(|kv| Ok(kv?.1.to_vec())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    #[test]
    fn a_corrupt_installation_record_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let cipher = Cipher::new(&MasterKey::parse(&"33".repeat(32)).unwrap());
        let store = Embedded::open(dir.path(), cipher).unwrap();
        let tenant = TenantId::generate();
        let repos = store.tenant(&tenant).unwrap();
        let id = InstallationId::generate();
        let sled_tenant = SledTenant {
            prefix: format!("{tenant}/"),
            tenant: tenant.clone(),
            tree: store.db.open_tree(format!("tenant/{tenant}")).unwrap(),
            cipher: store.cipher.clone(),
        };
        sled_tenant
            .tree
            .insert(
                sled_tenant.key("installation", id.as_str()),
                &b"{not json"[..],
            )
            .unwrap();
        assert!(matches!(
            InstallationRepo::get(&*repos, &id),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            InstallationRepo::list(&*repos),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
