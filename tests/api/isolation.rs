//! Cross-tenant isolation, for every repository: tenant A writes, tenant B reads the same ids through
//! the normal API and sees nothing. Also: tokens never sit in plaintext in the data files.

use agentgate::tenant::{PrincipalId, Role, ToolGrant};

use crate::helpers::{events, slack_install, slack_request, spawn_app_in};

#[tokio::test]
async fn no_repository_reads_across_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let t = &app.services.tenants;
    let a_inst = t
        .install(slack_install("T0AAA", "U0SAME", Some("xoxb-a")), "a", None)
        .await
        .unwrap();
    t.install(slack_install("T0BBB", "U0SAME", Some("xoxb-b")), "b", None)
        .await
        .unwrap();
    // The same user id in both workspaces, on purpose: the tenant, not the id, must separate them.
    let a = t.resolve(&slack_request("T0AAA", "U0SAME")).unwrap().ctx;
    let b = t.resolve(&slack_request("T0BBB", "U0SAME")).unwrap().ctx;
    assert_ne!(a.tenant_id(), b.tenant_id());
    let ra = app.services.store.for_tenant(&a).unwrap();
    let rb = app.services.store.for_tenant(&b).unwrap();

    // Settings.
    let mut sa = ra.settings().get().unwrap().unwrap();
    sa.name = "changed-by-a".into();
    sa.features.insert("secret-feature".into(), true);
    ra.settings().put(&sa).unwrap();
    let sb = rb.settings().get().unwrap().unwrap();
    assert_eq!(sb.name, "b");
    assert!(sb.features.is_empty());

    // Memberships.
    let p = PrincipalId::qualified("slack", "U0ONLYA").unwrap();
    ra.members().set_role(&p, Role::Admin).unwrap();
    assert_eq!(ra.members().role_of(&p).unwrap(), Some(Role::Admin));
    assert_eq!(rb.members().role_of(&p).unwrap(), None);
    assert!(!rb.members().list().unwrap().iter().any(|(q, _)| q == &p));
    assert_eq!(rb.members().remove(&p).unwrap(), None);
    assert_eq!(
        ra.members().role_of(&p).unwrap(),
        Some(Role::Admin),
        "B's remove did not touch A"
    );

    // Installations: A's installation id means nothing in B.
    assert!(ra
        .installations()
        .get(&a_inst.installation)
        .unwrap()
        .is_some());
    assert!(rb
        .installations()
        .get(&a_inst.installation)
        .unwrap()
        .is_none());
    assert!(rb
        .installations()
        .list()
        .unwrap()
        .iter()
        .all(|i| i.tenant == *b.tenant_id()));

    // Tool grants.
    let grant = ToolGrant {
        capability: "webhook.only_a".into(),
        min_role: Role::Member,
    };
    ra.grants().put(&grant).unwrap();
    assert!(ra.grants().list().unwrap().contains(&grant));
    assert!(!rb
        .grants()
        .list()
        .unwrap()
        .iter()
        .any(|g| g.capability == "webhook.only_a"));
    assert!(!rb.grants().remove("webhook.only_a").unwrap());
    assert!(ra.grants().list().unwrap().contains(&grant));

    // Events.
    let a_events = events(&app.services, &a).await;
    let b_events = events(&app.services, &b).await;
    assert!(!a_events.is_empty() && !b_events.is_empty());
    assert!(a_events
        .iter()
        .all(|e| e["tenant"] == a.tenant_id().as_str()));
    assert!(b_events
        .iter()
        .all(|e| e["tenant"] == b.tenant_id().as_str()));
    let b_text: String = b_events.iter().map(|e| e.to_string()).collect();
    assert!(
        !b_text.contains(a.tenant_id().as_str()),
        "nothing in B's log names A"
    );
    app.stop().await;
}

/// Recursively collects every file's bytes under `dir`.
fn all_bytes(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_bytes(&path, out);
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
}

#[tokio::test]
async fn tokens_are_not_in_plaintext_on_disk() {
    const CANARY: &str = "xoxb-CANARY-7f3a9c1e-plaintext-token";
    const REFRESH: &str = "xoxe-CANARY-refresh-5b2d";
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let mut new = slack_install("T0DISK", "U0A", Some(CANARY));
    new.refresh_token = Some(REFRESH.to_owned().into());
    app.services
        .tenants
        .install(new, "disk", None)
        .await
        .unwrap();
    let resolved = app
        .services
        .tenants
        .resolve(&slack_request("T0DISK", "U0A"))
        .unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(
        resolved.installation.bot_token.unwrap().expose_secret(),
        CANARY,
        "the token is stored"
    );
    app.services.store.flush().unwrap();
    app.stop().await;

    let mut files = Vec::new();
    all_bytes(dir.path(), &mut files);
    // Prove the scan sees the record itself: its sealed field name is on disk next to the ciphertext.
    let marker = b"bot_token_sealed";
    assert!(
        files
            .iter()
            .any(|(_, b)| b.windows(marker.len()).any(|w| w == marker)),
        "the installation record is in the scanned files"
    );
    for needle in [CANARY, REFRESH, "CANARY"] {
        for (path, bytes) in &files {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds {needle} in plaintext",
                path.display()
            );
        }
    }
}
