//! Resolving verified platform identities to contexts: the happy paths and every way to fail closed.

use agentgate::installation::{NewInstallation, PlatformIdentity, Workspace};
use agentgate::tenant::{
    Initiator, PrincipalId, ProvisionError, ResolveError, Role, WorkspaceRequest,
};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::helpers::{events, slack_install, slack_request, spawn_app_in};

#[tokio::test]
async fn a_workspace_request_resolves_to_its_tenant_with_the_members_role() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let t = &app.services.tenants;
    let installed = t
        .install(
            slack_install("T0ACME", "U0BOSS", Some("xoxb-acme")),
            "acme",
            None,
        )
        .await
        .unwrap();

    let owner = t.resolve(&slack_request("T0ACME", "U0BOSS")).unwrap();
    assert_eq!(owner.ctx.tenant_id(), &installed.tenant);
    assert_eq!(
        owner.ctx.role(),
        Role::Owner,
        "the installer owns the tenant"
    );
    assert!(owner.ctx.has_scope("admin:write"));
    assert_eq!(owner.ctx.principal().as_str(), "slack:U0BOSS");
    assert_eq!(
        owner.ctx.audit().correlation_id.as_ref().unwrap().as_str(),
        "13345224609.738474920.8088930838d88f008e0"
    );
    assert_eq!(owner.ctx.audit().initiator, Initiator::User);
    assert_eq!(owner.ctx.budget().tool_calls, 20);
    assert_eq!(
        owner
            .installation
            .bot_token
            .as_ref()
            .unwrap()
            .expose_secret(),
        "xoxb-acme"
    );

    let other = t.resolve(&slack_request("T0ACME", "U0SOMEONE")).unwrap();
    assert_eq!(
        other.ctx.role(),
        Role::Member,
        "an unlisted user gets the default role"
    );
    assert!(!other.ctx.has_scope("admin:write"));
    assert_ne!(
        other.ctx.audit().run_id,
        owner.ctx.audit().run_id,
        "every context has its own run id"
    );
    app.stop().await;
}

#[tokio::test]
async fn provisioning_writes_the_first_audit_event_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let t = &app.services.tenants;
    t.install(slack_install("T0NEW", "U0FIRST", None), "newco", None)
        .await
        .unwrap();
    let ctx = t.resolve(&slack_request("T0NEW", "U0FIRST")).unwrap().ctx;
    let repos = app.services.store.for_tenant(&ctx).unwrap();
    let events: Vec<Value> = events(&app.services, &ctx).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["tenant.provisioned", "role.granted", "installation.created"]
    );
    assert_eq!(events[0]["seq"], 0);
    assert_eq!(events[0]["tenant"], ctx.tenant_id().as_str());
    assert_eq!(events[0]["data"]["name"], "newco");
    let settings = repos.settings().get().unwrap().unwrap();
    assert_eq!(settings.llm.provider, "rules");
    let grants: Vec<String> = repos
        .grants()
        .list()
        .unwrap()
        .into_iter()
        .map(|g| g.capability)
        .collect();
    assert!(grants.contains(&"memory.save".to_owned()), "{grants:?}");
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_workspace_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let err = app
        .services
        .tenants
        .resolve(&slack_request("T0NOBODY", "U1"))
        .unwrap_err();
    assert!(matches!(err, ResolveError::UnknownWorkspace), "{err:?}");
    let err = app
        .services
        .tenants
        .resolve(&WorkspaceRequest {
            identity: PlatformIdentity::Discord {
                guild_id: "999".into(),
            },
            user: PrincipalId::qualified("discord", "1").unwrap(),
            correlation_id: None,
            initiator: Initiator::User,
        })
        .unwrap_err();
    assert!(matches!(err, ResolveError::UnknownWorkspace), "{err:?}");
    let malformed = WorkspaceRequest {
        identity: PlatformIdentity::Slack {
            enterprise_id: None,
            team_id: Some("not-a-team".into()),
        },
        ..slack_request("T0X", "U1")
    };
    assert!(matches!(
        app.services.tenants.resolve(&malformed),
        Err(ResolveError::Malformed(_))
    ));
    app.stop().await;
}

#[tokio::test]
async fn a_revoked_installation_resolves_to_nothing_and_forgets_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let t = &app.services.tenants;
    let installed = t
        .install(
            slack_install("T0GONE", "U0A", Some("xoxb-gone")),
            "gone",
            None,
        )
        .await
        .unwrap();
    assert!(t.resolve(&slack_request("T0GONE", "U0A")).is_ok());

    assert!(t
        .revoke_installation(&installed.installation, "uninstalled")
        .await
        .unwrap());
    assert!(
        !t.revoke_installation(&installed.installation, "uninstalled")
            .await
            .unwrap(),
        "revoking twice is a no-op"
    );
    let err = t.resolve(&slack_request("T0GONE", "U0A")).unwrap_err();
    assert!(matches!(err, ResolveError::Revoked), "{err:?}");

    let ctx = t.operator_context(&installed.tenant).unwrap();
    let inst = app
        .services
        .store
        .for_tenant(&ctx)
        .unwrap()
        .installations()
        .get(&installed.installation)
        .unwrap()
        .unwrap();
    assert!(
        inst.bot_token.is_none(),
        "a revoked installation keeps no token"
    );

    // A reinstall through OAuth brings the workspace back; the event log records both.
    let again = t
        .install(
            slack_install("T0GONE", "U0A", Some("xoxb-new")),
            "gone",
            None,
        )
        .await
        .unwrap();
    assert_eq!(again.installation, installed.installation);
    assert!(t.resolve(&slack_request("T0GONE", "U0A")).is_ok());

    let bad = t
        .revoke_workspace(&Workspace::slack_team(None, "T0NEVER").unwrap(), "x")
        .await;
    assert!(
        matches!(bad, Err(ProvisionError::UnknownWorkspace(_))),
        "{bad:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_declared_file_does_not_undo_an_operator_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let t = &app.services.tenants;
    let dev = t.resolve(&slack_request("T0DEV0001", "U0DEV0001")).unwrap();
    t.revoke_installation(&dev.installation.id, "operator")
        .await
        .unwrap();
    app.stop().await;

    let app = spawn_app_in(dir.path()).await;
    let err = app
        .services
        .tenants
        .resolve(&slack_request("T0DEV0001", "U0DEV0001"))
        .unwrap_err();
    assert!(matches!(err, ResolveError::Revoked), "{err:?}");
    app.stop().await;
}

#[tokio::test]
async fn an_org_wide_install_covers_the_orgs_teams_and_a_team_install_wins() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let t = &app.services.tenants;
    let org = NewInstallation {
        workspace: Workspace::slack_org("E0GRID").unwrap(),
        ..slack_install("T0UNUSED", "U0ORGADMIN", None)
    };
    let org_tenant = t.install(org, "grid", None).await.unwrap().tenant;
    let team_tenant = t
        .install(slack_install("T0OWN", "U0X", None), "own", None)
        .await
        .unwrap()
        .tenant;

    let in_org = |team: &str| WorkspaceRequest {
        identity: PlatformIdentity::Slack {
            enterprise_id: Some("E0GRID".into()),
            team_id: Some(team.into()),
        },
        ..slack_request(team, "U0ANY")
    };
    assert_eq!(
        t.resolve(&in_org("T0SOMETEAM")).unwrap().ctx.tenant_id(),
        &org_tenant
    );
    assert_eq!(
        t.resolve(&in_org("T0OWN")).unwrap().ctx.tenant_id(),
        &team_tenant
    );
    app.stop().await;
}

#[tokio::test]
async fn a_corrupt_installation_record_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let installed = app
        .services
        .tenants
        .install(slack_install("T0CORRUPT", "U0A", Some("xoxb-c")), "c", None)
        .await
        .unwrap();
    app.stop().await;

    // Damage the record on disk, as a failing disk or a hand edit would.
    {
        let db = sled::open(dir.path().join("store")).unwrap();
        let tree = db
            .open_tree(format!("tenant/{}", installed.tenant))
            .unwrap();
        let key = format!(
            "{}/installation/{}",
            installed.tenant, installed.installation
        );
        assert!(
            tree.get(&key).unwrap().is_some(),
            "the test damages the real record key"
        );
        tree.insert(key, &b"{\"v\":1,\"garbage\""[..]).unwrap();
        db.flush().unwrap();
    }
    let app = spawn_app_in(dir.path()).await;
    let err = app
        .services
        .tenants
        .resolve(&slack_request("T0CORRUPT", "U0A"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Store(agentgate::store::StoreError::Corrupt { .. })
        ),
        "{err:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_tampered_sealed_token_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let installed = app
        .services
        .tenants
        .install(slack_install("T0SEAL", "U0A", Some("xoxb-s")), "s", None)
        .await
        .unwrap();
    app.stop().await;
    {
        let db = sled::open(dir.path().join("store")).unwrap();
        let tree = db
            .open_tree(format!("tenant/{}", installed.tenant))
            .unwrap();
        let key = format!(
            "{}/installation/{}",
            installed.tenant, installed.installation
        );
        let mut rec: Value = serde_json::from_slice(&tree.get(&key).unwrap().unwrap()).unwrap();
        let sealed = rec["bot_token_sealed"].as_str().unwrap().to_owned();
        // Flip one character of the ciphertext's base64.
        let mut chars: Vec<char> = sealed.chars().collect();
        chars[20] = if chars[20] == 'A' { 'B' } else { 'A' };
        rec["bot_token_sealed"] = Value::String(chars.into_iter().collect());
        tree.insert(key, serde_json::to_vec(&rec).unwrap()).unwrap();
        db.flush().unwrap();
    }
    let app = spawn_app_in(dir.path()).await;
    let err = app
        .services
        .tenants
        .resolve(&slack_request("T0SEAL", "U0A"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Store(agentgate::store::StoreError::Sealed { .. })
        ),
        "{err:?}"
    );
    app.stop().await;
}

/// The sweeper's pass forgets old request ids in every tenant, through each tenant's own
/// repository, and keeps the recent ones.
#[tokio::test]
async fn old_request_ids_are_forgotten_in_every_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let t = &app.services.tenants;
    let mut ctxs = Vec::new();
    for (team, name) in [("T0SWEEPA", "a"), ("T0SWEEPB", "b")] {
        t.install(slack_install(team, "U0BOSS", None), name, None)
            .await
            .unwrap();
        let ctx = t.resolve(&slack_request(team, "U0BOSS")).unwrap().ctx;
        let repo = app.services.store.for_tenant(&ctx).unwrap();
        assert_eq!(
            repo.dedupe().claim("slack-event:Ev1", 0).unwrap(),
            agentgate::store::SeenClaim::First
        );
        ctxs.push(ctx);
    }
    let now = chrono::Utc::now().timestamp();
    assert_eq!(t.sweep_seen(now - 3600).unwrap(), 0, "all are recent");
    for ctx in &ctxs {
        let repo = app.services.store.for_tenant(ctx).unwrap();
        assert_ne!(
            repo.dedupe().claim("slack-event:Ev1", 0).unwrap(),
            agentgate::store::SeenClaim::First
        );
    }
    assert_eq!(t.sweep_seen(now + 2).unwrap(), 2);
    for ctx in &ctxs {
        let repo = app.services.store.for_tenant(ctx).unwrap();
        assert_eq!(
            repo.dedupe().claim("slack-event:Ev1", 0).unwrap(),
            agentgate::store::SeenClaim::First,
            "forgotten"
        );
    }
    app.stop().await;
}

/// Appends events, then reports that what follows the append failed (a fold, a due checkpoint),
/// as the audit log does with `AuditError::AfterDurable`.
struct DurableThenFails {
    inner: std::sync::Arc<dyn agentgate::audit::AuditSink>,
}

#[async_trait::async_trait]
impl agentgate::audit::AuditSink for DurableThenFails {
    async fn append(
        &self,
        ctx: &agentgate::tenant::TenantContext,
        body: agentgate::audit::event::EventBody,
    ) -> Result<u64, agentgate::audit::AuditError> {
        self.inner.append(ctx, body).await?;
        Err(agentgate::audit::AuditError::AfterDurable(Box::new(
            agentgate::audit::AuditError::Checkpoint("the checkpoint could not be signed".into()),
        )))
    }
}

/// A change whose event is durable is made even when what follows the append failed: the
/// installation, the owner's role and an API key were on record but never stored.
#[tokio::test]
async fn a_change_on_record_is_made_when_what_follows_its_append_fails() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path()).await;
    let tenants = agentgate::tenant::Tenants::new(
        app.services.store.clone(),
        std::sync::Arc::new(DurableThenFails {
            inner: app.services.sink.clone(),
        }),
        secrecy::SecretString::from("a pepper for this test only"),
    );
    let installed = tenants
        .install(slack_install("T0AFTER", "U0BOSS", None), "after", None)
        .await
        .expect("on record, so installed");
    let owner = tenants
        .resolve(&slack_request("T0AFTER", "U0BOSS"))
        .unwrap();
    assert_eq!(owner.ctx.tenant_id(), &installed.tenant);
    assert_eq!(owner.ctx.role(), Role::Owner, "the owner's role was stored");
    let key = tenants
        .create_key(
            &owner.ctx,
            "ci",
            agentgate::tenant::KeyRole::Compliance,
            vec![],
            None,
        )
        .await
        .expect("on record, so made");
    let stored = app
        .services
        .store
        .for_tenant(&owner.ctx)
        .unwrap()
        .api_keys()
        .get_key(&key.record.id)
        .unwrap();
    assert!(stored.is_some(), "the key was stored");
    app.stop().await;
}
