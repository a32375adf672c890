//! Startup: open the master key, the store and the services; upsert declared installations; bind the
//! listener; run the server until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use secrecy::SecretString;
use tokio::net::TcpListener;

use crate::agent::{Agent, AgentConfig};
use crate::audit::keys::{self, SigningKeySource};
use crate::audit::log::{AuditLog, AuditSettings, LogSink};
use crate::config::{AuditOptions, Config};
use crate::crypto::{Cipher, KeySource, MasterKey};
use crate::http::{router, AppState};
use crate::installation::manifest;
use crate::store::Store;
use crate::tenant::{InstallOutcome, Tenants};
use crate::transport::slack::SlackState;
use crate::transport::SystemClock;

/// The store and the services over it, shared by `serve` and the operator's commands.
#[derive(Clone)]
pub struct Services {
    /// The store.
    pub store: Store,
    /// Tenancy.
    pub tenants: Tenants,
    /// The per-tenant audit logs.
    pub audit: AuditLog,
    /// The gated agent loop.
    pub agent: Agent,
    /// The audit sink every transport records commands through.
    pub sink: Arc<dyn crate::audit::AuditSink>,
    /// The key that signs OAuth install states, derived from the master key.
    pub state_key: SecretString,
}

impl Services {
    /// Opens the data directory: the master key (warning when it is a development key file) and the store.
    ///
    /// # Errors
    /// A bad master key, an unreadable data directory, or a store held by another process.
    pub fn open(
        data_dir: &Path,
        master_key: Option<&SecretString>,
        audit: &AuditOptions,
    ) -> anyhow::Result<Self> {
        Self::open_with(data_dir, master_key, audit, AgentConfig::default())
    }

    /// As [`Services::open`], with the agent loop's settings.
    ///
    /// # Errors
    /// As [`Services::open`].
    pub fn open_with(
        data_dir: &Path,
        master_key: Option<&SecretString>,
        audit: &AuditOptions,
        agent: AgentConfig,
    ) -> anyhow::Result<Self> {
        Self::open_with_segments(data_dir, master_key, audit, agent, Default::default())
    }

    /// As [`Services::open_with`], with the audit logs' segment file options: tests use small
    /// segments to make rolls happen; the product always uses the defaults.
    pub(crate) fn open_with_segments(
        data_dir: &Path,
        master_key: Option<&SecretString>,
        audit: &AuditOptions,
        agent: AgentConfig,
        segments: crate::audit::segment_log::Options,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        let (key, source) = MasterKey::load_or_generate(master_key, data_dir)
            .context("cannot load the master key")?;
        match source {
            KeySource::Configured => {}
            KeySource::KeyFile(path) | KeySource::Generated(path) => tracing::warn!(
                path = %path.display(),
                "AGENTGATE_MASTER_KEY is not set: tokens are sealed with a development key file; set AGENTGATE_MASTER_KEY in production"
            ),
        }
        let store = Store::open_embedded(data_dir, Cipher::new(&key))
            .with_context(|| format!("cannot open the store in {}", data_dir.display()))?;
        let audit_dir = data_dir.join("audit");
        let (signer, source) = keys::load_signing_key(
            audit.signing_key.as_ref(),
            audit.signing_key_file.as_deref(),
            &audit_dir,
        )
        .context("cannot load the audit signing key")?;
        if let SigningKeySource::Generated(path) = &source {
            tracing::warn!(path = %path.display(), "no audit signing key configured: generated a development key; set AGENTGATE_AUDIT_SIGNING_KEY in production");
        }
        let keyring =
            keys::update_keyring(&audit_dir, &signer).context("cannot update the audit keyring")?;
        let log = AuditLog::new(
            AuditSettings {
                dir: audit_dir,
                origin_prefix: audit.origin_prefix.clone(),
                checkpoint_every: audit.checkpoint_every.max(1),
                checkpoint_interval: audit.checkpoint_interval,
                segments,
            },
            signer,
            keyring,
        );
        let sink = Arc::new(LogSink::new(log.clone(), store.clone()));
        let tenants = Tenants::new(
            store.clone(),
            sink.clone(),
            key.derive("agentgate api key hash v1"),
        );
        let agent = Agent::new(tenants.clone(), log.clone(), sink.clone(), agent);
        Ok(Services {
            store,
            tenants,
            audit: log,
            agent,
            sink,
            state_key: key.derive("agentgate oauth state v1"),
        })
    }

    /// Opens the audit log of every tenant, so each is recovered and checked now and takes part in
    /// heartbeats from the start.
    ///
    /// # Errors
    /// The first tenant whose log cannot be opened or does not match its checkpoint.
    pub async fn open_audit_logs(&self) -> anyhow::Result<()> {
        for t in self.store.admin().tenants()? {
            let ctx = self.tenants.operator_context(&t.id)?;
            let repo = self.store.for_tenant(&ctx)?;
            self.audit
                .open_tenant(&ctx, repo)
                .await
                .with_context(|| format!("cannot open the audit log of tenant {}", t.id))?;
        }
        Ok(())
    }

    /// Signs what is unsigned, closes the audit logs and flushes the store.
    ///
    /// # Errors
    /// The first failure.
    pub async fn close(&self) -> anyhow::Result<()> {
        self.audit
            .close()
            .await
            .context("cannot close the audit logs")?;
        self.store.flush().context("cannot flush the store")?;
        Ok(())
    }

    /// Upserts every declarative file in `dir`. A missing directory is not an error: there is nothing
    /// to declare. Returns how many installations were created or changed.
    ///
    /// # Errors
    /// A file that does not parse, or a store failure; nothing from a bad directory is imported.
    pub async fn import_installations(&self, dir: &Path) -> anyhow::Result<usize> {
        if !dir.exists() {
            tracing::info!(dir = %dir.display(), "no installations directory; nothing to import");
            return Ok(0);
        }
        let manifests = manifest::load(dir).context("cannot read the installations directory")?;
        let mut changed = 0;
        for m in &manifests {
            for var in &m.missing_env {
                tracing::warn!(file = %m.path.display(), variable = %var, "token variable is not set; replies through the platform API will fail");
            }
            let done = self
                .tenants
                .import_manifest(m)
                .await
                .with_context(|| format!("cannot import {}", m.path.display()))?;
            for d in &done {
                if d.outcome != InstallOutcome::Unchanged {
                    changed += 1;
                }
                tracing::info!(file = %m.path.display(), tenant = %d.tenant, installation = %d.installation, outcome = ?d.outcome, "installation imported");
            }
        }
        Ok(changed)
    }
}

/// The built server: bound, with its services, not yet serving.
pub struct Application {
    listener: TcpListener,
    services: Services,
    config: Config,
}

impl Application {
    /// Opens the services, upserts the declared installations and binds the listener.
    ///
    /// # Errors
    /// Any startup step; the message says which.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let services = Services::open_with(
            &config.data_dir,
            config.master_key.as_ref(),
            &config.audit,
            config.agent.clone(),
        )?;
        services.open_audit_logs().await?;
        services
            .import_installations(&config.installations_dir)
            .await?;
        services.store.flush().context("cannot flush the store")?;
        let addr = SocketAddr::new(config.bind, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        Ok(Application {
            listener,
            services,
            config,
        })
    }

    /// The port actually bound (useful when the configured port was 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The services, for tests and commands that run beside the server.
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Serves until `shutdown` completes, then drains in-flight requests and flushes the store.
    ///
    /// # Errors
    /// A failure of the server or of the final flush.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = AppState {
            store: self.services.store.clone(),
            tenants: self.services.tenants.clone(),
            agent: self.services.agent.clone(),
            audit: self.services.audit.clone(),
            sink: self.services.sink.clone(),
            api_limiter: Arc::new(crate::agent::budget::RunLimiter::new(
                self.config.api_requests_per_minute,
            )),
            exports: Arc::default(),
            request_timeout: self.config.request_timeout,
            handlers: tokio_util::task::TaskTracker::new(),
        };
        let handlers = state.handlers.clone();
        let mut transports = Vec::new();
        let slack_state = match self.config.slack.clone() {
            Some(slack) => Some(
                SlackState::new(
                    slack,
                    Arc::new(SystemClock),
                    self.services.tenants.clone(),
                    self.services.agent.clone(),
                    self.services.sink.clone(),
                    self.services.state_key.clone(),
                )
                .context("cannot build the Slack client")?,
            ),
            None => None,
        };
        if let Some(s) = &slack_state {
            transports.push(crate::transport::slack::router(s.clone()));
            tracing::info!("Slack routes enabled");
        }
        // The Discord Gateway runs in this process when a bot token is configured (the embedded
        // store serves one process).
        let mut gateway = None;
        if let Some(token) = self
            .config
            .discord
            .as_ref()
            .and_then(|d| d.bot_token.clone())
        {
            let api_url = self
                .config
                .discord
                .as_ref()
                .map(|d| d.api_url.clone())
                .unwrap_or_default();
            let handler = crate::transport::discord::gateway::Handler::new(
                self.services.tenants.clone(),
                self.services.agent.clone(),
                self.services.sink.clone(),
                handlers.clone(),
            );
            let mut client = crate::transport::discord::gateway::client(&token, &api_url, handler)
                .await
                .context("cannot build the Discord gateway client")?;
            let shards = client.shard_manager.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = client.start().await {
                    tracing::error!(error = %e, "the Discord gateway stopped");
                }
            });
            gateway = Some((shards, task));
            tracing::info!("Discord gateway started");
        }
        let discord_state = self.config.discord.clone().map(|discord| {
            crate::transport::discord::DiscordState::new(
                discord,
                Arc::new(SystemClock),
                self.services.tenants.clone(),
                self.services.agent.clone(),
                self.services.sink.clone(),
                self.services.state_key.clone(),
            )
        });
        if let Some(d) = &discord_state {
            transports.push(crate::transport::discord::router(d.clone()));
            tracing::info!("Discord routes enabled");
        }
        let app = router(state, self.config.request_timeout, transports);
        // Answers go back to where their commands came from, also for runs resumed below.
        self.services
            .agent
            .set_reply_sink(Arc::new(crate::transport::Replies {
                slack: slack_state,
                discord: discord_state,
            }));
        let addr = self
            .listener
            .local_addr()
            .context("listener has no address")?;
        // Runs that a crash interrupted continue from their own checkpoints.
        let agent = self.services.agent.clone();
        tokio::spawn(async move {
            match agent.resume_unfinished().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(runs = n, "resumed unfinished runs"),
                Err(e) => tracing::error!(error = %e, "resuming unfinished runs failed"),
            }
        });
        // One shutdown signal, fanned out to the server and the checkpointer.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        // The checkpointer signs what is unsigned and closes the logs when told to, which is
        // once the server and every request's handler are done with them.
        let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
        let checkpointer = tokio::spawn(
            self.services
                .audit
                .clone()
                .run_checkpointer(wait(closing_rx)),
        );
        // Finished runs' checkpoint files go in batches, after one store flush a batch.
        let store = self.services.store.clone();
        let tenants = self.services.tenants.clone();
        let mut stop_sweeps = stop_rx.clone();
        let sweeper = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
            // Request ids are swept once an hour (every tenant's are read), the first time at start.
            let mut seen_sweep: Option<std::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop_sweeps.wait_for(|stop| *stop) => return,
                }
                if seen_sweep.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(3600)) {
                    seen_sweep = Some(std::time::Instant::now());
                    let t = tenants.clone();
                    let before = chrono::Utc::now().timestamp() - crate::transport::SEEN_TTL_SECS;
                    match tokio::task::spawn_blocking(move || t.sweep_seen(before)).await {
                        Ok(Ok(n)) if n > 0 => {
                            tracing::info!(forgotten = n, "swept old platform request ids")
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "sweeping old platform request ids failed; will retry in an hour")
                        }
                        Err(e) => tracing::error!(error = %e, "the request id sweeper panicked"),
                    }
                }
                let s = store.clone();
                // Nonces of install states that have expired can never be offered again; twice
                // the states' lifetime, so that a state checked in its last second is consumed
                // before its nonce can be swept.
                let expired = chrono::Utc::now().timestamp()
                    - 2 * crate::transport::install_state::STATE_TTL_SECS;
                match tokio::task::spawn_blocking(move || (s.sweep_nonces(expired), s.sweep_runs()))
                    .await
                {
                    Ok((nonces, runs)) => {
                        if let Err(e) = nonces {
                            tracing::warn!(error = %e, "sweeping used install nonces failed; will retry");
                        }
                        if let Err(e) = runs {
                            tracing::warn!(error = %e, "sweeping finished runs failed; will retry");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "the run sweeper panicked"),
                }
            }
        });
        tracing::info!(%addr, "agentgate listening");
        let served = crate::http::serve::serve(
            self.listener,
            app,
            wait(stop_rx),
            // At least a second, whatever a library caller configured: hyper cuts a connection
            // whose headers are not in by then, an idle pooled one included.
            self.config
                .request_timeout
                .max(std::time::Duration::from_secs(1)),
            // Time for the requests in flight to finish (an export is not under the timeout).
            self.config.request_timeout + std::time::Duration::from_secs(5),
        )
        .await
        .context("server failed");
        if let Some((shards, task)) = gateway {
            // Bounded: a Gateway connection that does not close in time must not hold the stop
            // (its event handlers are tracked below, with the HTTP handlers).
            let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                shards.shutdown_all().await;
                let _ = task.await;
            })
            .await;
            if closed.is_err() {
                tracing::warn!(
                    "the Discord Gateway did not close within 10 s; stopping without it"
                );
            }
        }
        // Handlers a 408 or the drain left running still finish what they started (within the
        // same bound), before the logs and the store close under them.
        handlers.close();
        if tokio::time::timeout(
            self.config.request_timeout + std::time::Duration::from_secs(5),
            handlers.wait(),
        )
        .await
        .is_err()
        {
            tracing::warn!(
                handlers = handlers.len(),
                "request handlers still running when the server stopped"
            );
        }
        let _ = closing_tx.send(true);
        checkpointer.await.context("the checkpointer panicked")?;
        let _ = sweeper.await;
        served?;
        self.services.close().await?;
        tracing::info!("agentgate stopped");
        Ok(())
    }
}
