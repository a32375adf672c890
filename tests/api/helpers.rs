//! `spawn_app()`: the real application on 127.0.0.1:0 over a temporary data directory.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentgate::app::{Application, Services};
use agentgate::config::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running application and what a test needs to talk to it.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// The services the server runs on, sharing its store.
    pub services: Services,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The repository's own `installations/` directory, with the dev tenant.
pub fn repo_installations() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("installations")
}

/// A configuration for tests: port 0, loopback, a fixed master key.
pub fn test_config(data_dir: &Path, installations_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_owned(),
        installations_dir: installations_dir.to_owned(),
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        master_key: Some("42".repeat(32).into()),
        request_timeout: Duration::from_secs(10),
        audit: agentgate::config::AuditOptions::default(),
        agent: agentgate::agent::AgentConfig::default(),
        api_requests_per_minute: std::num::NonZeroU32::new(600).unwrap(),
        slack: None,
        discord: None,
    }
}

/// Starts the application over `data_dir` with the repository's installations.
pub async fn spawn_app_in(data_dir: &Path) -> TestApp {
    spawn_with(test_config(data_dir, &repo_installations())).await
}

/// Starts the application with `config`.
pub async fn spawn_with(config: Config) -> TestApp {
    let app = Application::build(config)
        .await
        .expect("the application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let services = app.services().clone();
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    TestApp {
        address,
        services,
        stop: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    /// GETs a path and returns status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = reqwest::get(format!("{}{path}", self.address))
            .await
            .expect("request reaches the server");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("a body"))
    }

    /// Stops the server gracefully and waits until it has released the store.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await
                .expect("the server task ends")
                .expect("the server stops cleanly");
        }
        // The store closes when its last handle is gone.
        drop(self.services);
    }
}

/// A Slack team installation as an OAuth install would bring it.
pub fn slack_install(
    team: &str,
    installer: &str,
    token: Option<&str>,
) -> agentgate::installation::NewInstallation {
    use agentgate::installation::{InstallSource, NewInstallation, Workspace};
    NewInstallation {
        workspace: Workspace::slack_team(None, team).unwrap(),
        app_id: "A0TEST".into(),
        bot_user_id: Some("U0BOT".into()),
        bot_token: token.map(|t| t.to_owned().into()),
        refresh_token: None,
        token_expires_at: None,
        scopes: vec!["commands".into()],
        installer: agentgate::tenant::PrincipalId::qualified("slack", installer).unwrap(),
        source: InstallSource::OAuth,
    }
}

/// A verified Slack request from `user` in `team`.
pub fn slack_request(team: &str, user: &str) -> agentgate::tenant::WorkspaceRequest {
    agentgate::tenant::WorkspaceRequest {
        identity: agentgate::installation::PlatformIdentity::Slack {
            enterprise_id: None,
            team_id: Some(team.into()),
        },
        user: agentgate::tenant::PrincipalId::qualified("slack", user).unwrap(),
        correlation_id: Some("13345224609.738474920.8088930838d88f008e0".parse().unwrap()),
        initiator: agentgate::tenant::Initiator::User,
    }
}

/// Every event of the context's tenant, parsed, in order, read from its audit log.
pub async fn events(
    services: &Services,
    ctx: &agentgate::tenant::TenantContext,
) -> Vec<serde_json::Value> {
    let repo = services.store.for_tenant(ctx).unwrap();
    let head = services.audit.head(ctx, repo.clone()).await.unwrap();
    services
        .audit
        .read_range(ctx, repo, 0, head.size)
        .await
        .unwrap()
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect()
}
