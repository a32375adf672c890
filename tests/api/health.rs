//! `serve` on port 0: health and readiness, the data directory and the dev installation, idempotent restarts.

use crate::helpers::{events, spawn_app_in};

/// The events of a tenant other than the log's own checkpoint records.
async fn domain_events(
    services: &agentgate::app::Services,
    ctx: &agentgate::tenant::TenantContext,
) -> Vec<serde_json::Value> {
    events(services, ctx)
        .await
        .into_iter()
        .filter(|e| e["type"] != "checkpoint.signed")
        .collect()
}

#[tokio::test]
async fn serve_answers_health_and_creates_the_data_dir_and_dev_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let app = spawn_app_in(&data).await;

    assert_eq!(app.get("/healthz").await, (200, "ok".to_owned()));
    assert_eq!(app.get("/readyz").await, (200, "ready".to_owned()));
    assert_eq!(app.get("/nope").await.0, 404);

    assert!(
        data.join("store").is_dir(),
        "the store lives under the data directory"
    );
    let tenants = app.services.store.admin().tenants().unwrap();
    assert_eq!(tenants.len(), 1, "{tenants:?}");
    assert_eq!(tenants[0].name, "dev");
    let ctx = app
        .services
        .tenants
        .operator_context(&tenants[0].id)
        .unwrap();
    let repos = app.services.store.for_tenant(&ctx).unwrap();
    let keys: Vec<String> = repos
        .installations()
        .list()
        .unwrap()
        .iter()
        .map(|i| i.workspace.directory_key())
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.contains(&"slack:team:T0DEV0001".to_owned()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"discord:guild:100000000000000001".to_owned()),
        "{keys:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_second_start_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let first = spawn_app_in(&data).await;
    let tenants_before = first.services.store.admin().tenants().unwrap();
    let ctx = first
        .services
        .tenants
        .operator_context(&tenants_before[0].id)
        .unwrap();
    let repos = first.services.store.for_tenant(&ctx).unwrap();
    let installs_before: Vec<String> = repos
        .installations()
        .list()
        .unwrap()
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    let events_before = domain_events(&first.services, &ctx).await;
    let head = first
        .services
        .audit
        .head(&ctx, first.services.store.for_tenant(&ctx).unwrap())
        .await
        .unwrap();
    assert!(
        head.checkpoint.is_none(),
        "nothing signed yet: the interval is a minute"
    );
    let members_before = repos.members().list().unwrap();
    drop(repos);
    first.stop().await;

    let second = spawn_app_in(&data).await;
    let tenants_after = second.services.store.admin().tenants().unwrap();
    assert_eq!(tenants_after, tenants_before);
    let ctx = second
        .services
        .tenants
        .operator_context(&tenants_after[0].id)
        .unwrap();
    let repos = second.services.store.for_tenant(&ctx).unwrap();
    let installs_after: Vec<String> = repos
        .installations()
        .list()
        .unwrap()
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(installs_after, installs_before);
    let head = second
        .services
        .audit
        .head(&ctx, second.services.store.for_tenant(&ctx).unwrap())
        .await
        .unwrap();
    let note = head
        .checkpoint
        .expect("a graceful stop signs what was unsigned");
    assert!(
        note.contains(&format!("\n{}\n", head.size - 1)),
        "the stop's checkpoint covers every event before its own record: {note}"
    );
    assert_eq!(
        domain_events(&second.services, &ctx).await,
        events_before,
        "a restart appends no events besides checkpoints"
    );
    assert_eq!(repos.members().list().unwrap(), members_before);
    drop(repos);
    second.stop().await;
}
