//! Start-up and shutdown: build the router from its configuration, accept connections,
//! and drain them on the way out.
//!
//! Start-up probes every replica once before the first connection is accepted, so a
//! router started against a healthy fleet routes its first request. Each accepted
//! connection gets TCP_NODELAY (SSE events must not wait for Nagle) and a limit on how
//! long its writes may stall ([`StallLimited`]), goes through TLS when the listener
//! has a certificate ([`crate::ingress::tls`]), and is served by hyper as HTTP/1.1 or
//! HTTP/2 (h2 by ALPN, or h2c with prior knowledge). hyper notices a client that
//! closes mid-request (or resets its stream) and drops the request's future,
//! cancelling the upstream request with it. Shutdown stops accepting,
//! lets in-flight requests finish for up to the drain timeout, then returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use std::future::Future;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::RouterConfig;
use crate::dispatch::Dispatcher;
use crate::dispatch::pd::PrefillDecode;
use crate::ingress::client_io::StallLimited;
use crate::ingress::h2_streams::{ConnectionStreams, StreamCounters, StreamExecutor};
use crate::ingress::keep_alive::Activity;
use crate::ingress::routing_key::KeyHeaders;
use crate::ingress::{self, Ingress};
use crate::metrics::Metrics;
use crate::policy::prompt_tokens::TokenizePool;
use crate::replicas::{HealthChecker, Registry, RegistryConfig, Stage};
use crate::upstream::proxy;

/// A router serving on `addr` until [`RunningRouter::shutdown`].
pub struct RunningRouter {
    pub addr: SocketAddr,
    /// Where the admin API listens when it has its own address (`--admin-listen`).
    pub admin_addr: Option<SocketAddr>,
    admin_stop: Option<oneshot::Sender<()>>,
    /// The simulated replicas started for `--sim`, served as long as the router is.
    pub sims: Vec<vllm_sim::RunningSim>,
    pub metrics: Arc<Metrics>,
    /// The replicas requests go to (in P/D mode, the decode replicas).
    pub registry: Arc<Registry>,
    /// P/D mode: the prefill replicas.
    pub prefill_registry: Option<Arc<Registry>>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    /// Span export, flushed at shutdown.
    tracing: Option<Arc<crate::trace::Tracing>>,
    health: Vec<JoinHandle<()>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    shutdown_delay: Duration,
}

impl RunningRouter {
    /// Say `draining` on `/health` and keep serving for the shutdown delay; then stop
    /// accepting, drain in-flight requests (bounded by the drain timeout), stop.
    pub async fn shutdown(mut self) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        if !self.shutdown_delay.is_zero() {
            tracing::info!(delay = ?self.shutdown_delay, "draining: /health answers 503 until the delay ends");
            tokio::time::sleep(self.shutdown_delay).await;
        }
        for stop in [self.stop.take(), self.admin_stop.take()].into_iter().flatten() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
        self.health.iter().for_each(JoinHandle::abort);
        if let Some(tracing) = self.tracing.take() {
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        }
    }
}

/// Build the router and start serving on `config.listen` (after starting the simulated
/// replicas of `--sim` / `--sim-pd`, if any).
pub async fn start(mut config: RouterConfig) -> std::io::Result<RunningRouter> {
    let mut sims = Vec::new();
    if let Some(sim) = &config.sim {
        let prefill_sims = config.pd.as_ref().map_or(0, |pd| pd.sim_prefill);
        // kv-aware: the simulated replicas publish KV events, each on a free port.
        let kv_events = config
            .kv_events
            .as_ref()
            .map(|feed| vllm_sim::kv_events::PublisherConfig { port: 0, topic: feed.topic.clone() });
        // Generate mode: the simulated replicas serve vLLM's token-in, token-out endpoint.
        let scale_out = sim.enable_scale_out || config.engine_api == crate::frontend::EngineApi::Generate;
        let role = |role| vllm_sim::SimConfig {
            role,
            kv_events: kv_events.clone(),
            enable_scale_out: scale_out,
            ..sim.clone()
        };
        let (prefill_role, decode_role) = if prefill_sims > 0 {
            (vllm_sim::Role::Prefill, vllm_sim::Role::Decode)
        } else {
            (vllm_sim::Role::Both, vllm_sim::Role::Both)
        };
        for sim in vllm_sim::start_fleet(prefill_sims, &role(prefill_role)).await? {
            config.pd.as_mut().expect("prefill sims imply P/D").prefill.push(sim_url(&sim));
            sims.push(sim);
        }
        for sim in vllm_sim::start_fleet(config.sim_replicas, &role(decode_role)).await? {
            config.replicas.push(sim_url(&sim));
            sims.push(sim);
        }
        if let Some(feed) = &mut config.kv_events {
            for sim in &sims {
                if let Some(port) = sim.kv_events_port {
                    feed.endpoints
                        .push((sim_url(sim).name().to_owned(), format!("tcp://{}:{port}", sim.addr.ip())));
                }
            }
        }
    }
    let listen = config.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::new());
    let client = proxy::http_client(config.connect_timeout);
    let relay = crate::upstream::relay::Relay::new(config.connect_timeout);

    let pool = config.tokenizer.as_ref().map(|_| {
        let pool_metrics = crate::policy::prompt_tokens::pool::PoolMetrics {
            jobs: metrics.tokenizer_jobs.clone(),
            queued: metrics.tokenizer_queued.clone(),
            busy: metrics.tokenizer_busy.clone(),
        };
        TokenizePool::new(config.tokenizer_threads, config.tokenizer_queue, Some(pool_metrics))
    });
    let (dispatcher, health, checker) =
        stage(&config, config.replicas.clone(), config.policy, &client, &relay, &metrics, &pool).await;
    let registry = dispatcher.registry.clone();
    let mut tasks = vec![health];
    let main_role = if config.pd.is_some() { "decode" } else { "replica" };
    let mut stages = vec![Stage { role: main_role, registry: registry.clone(), checker }];
    let pd = match &config.pd {
        Some(pd) => {
            let (prefill, health, checker) =
                stage(&config, pd.prefill.clone(), pd.prefill_policy, &client, &relay, &metrics, &pool).await;
            tasks.push(health);
            stages.push(Stage { role: "prefill", registry: prefill.registry.clone(), checker });
            let names = |registry: &Registry| -> Vec<String> {
                registry.fleet().replicas.iter().map(|r| r.name().to_owned()).collect()
            };
            let (p, d) = (names(&prefill.registry), names(&registry));
            metrics.add_pd(
                &p.iter().map(String::as_str).collect::<Vec<_>>(),
                &d.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            Some(PrefillDecode::new(prefill, pd.tokenize_once, metrics.clone()))
        }
        None => None,
    };
    if config.discovery.is_on() {
        let prefill = stages.iter().find(|s| s.role == "prefill");
        let found = crate::discovery::start(&config.discovery, &stages[0], prefill)
            .await
            .map_err(std::io::Error::other)?;
        tasks.extend(found);
    }
    let admin = config.admin_token.clone().map(|token| Arc::new(Admin::new(token, stages)).routes());
    let (admin_here, admin_apart) = match config.admin_listen {
        Some(_) => (None, admin),
        None => (admin, None),
    };
    let prefill_registry = pd.as_ref().map(|pd| pd.prefill.registry.clone());
    let registries = std::iter::once(registry.clone()).chain(prefill_registry.clone()).collect();
    tasks.push(relay.reaper(registries, metrics.upstream_idle_connections.clone()));
    let tracing = match &config.trace {
        Some(trace) => Some(crate::trace::Tracing::start(trace).map_err(std::io::Error::other)?),
        None => None,
    };
    tasks.push(crate::reload::absorb_hangup());
    let api_keys = crate::admission::ApiKeys::new(config.api_keys.clone());
    let rate_limits = match &config.state_store {
        Some(store) => crate::admission::key_limits::KeyLimits::open_shared(store, &metrics),
        None => crate::admission::key_limits::KeyLimits::default(),
    };
    for key in &config.api_keys {
        metrics.add_key(&key.name, key.priority.label());
    }
    if config.limit.is_some() {
        metrics.queue_wait.with_label_values(&[ingress::ANONYMOUS, "normal"]);
    }
    if let Some(path) = config.key_source.file.clone() {
        let (source, keys, limits, metrics) =
            (config.key_source.clone(), api_keys.clone(), rate_limits.clone(), metrics.clone());
        tasks.push(crate::reload::watch(
            "api_keys",
            vec![path],
            metrics.config_reloads.clone(),
            move || source.load(),
            move |loaded: Vec<crate::admission::ApiKey>| {
                for key in &loaded {
                    metrics.add_key(&key.name, key.priority.label());
                }
                let count = loaded.len();
                keys.replace(loaded);
                limits.retain(&keys.names());
                tracing::info!(keys = count, "API keys reloaded");
            },
        ));
    }
    let tls = |files: &Option<crate::ingress::tls::TlsFiles>, label| -> std::io::Result<_> {
        match files {
            Some(files) => {
                let (acceptor, watcher) =
                    crate::ingress::tls::acceptor(files, label, metrics.config_reloads.clone())
                        .map_err(|e| std::io::Error::other(format!("TLS: {e}")))?;
                Ok((Some(acceptor), Some(watcher)))
            }
            None => Ok((None, None)),
        }
    };
    let (serving_tls, watcher) = tls(&config.tls, "tls")?;
    tasks.extend(watcher);
    let (admin_tls, watcher) = tls(&config.admin_tls, "admin_tls")?;
    tasks.extend(watcher);
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ingress = Arc::new(Ingress {
        draining: draining.clone(),
        dispatcher: Arc::new(dispatcher),
        pd,
        frontend: (config.engine_api == crate::frontend::EngineApi::Generate).then(|| {
            crate::frontend::Frontend {
                continuation_attempts: config.continuation_attempts,
                tokenizer: config.tokenizer.clone().expect("generate mode loads a tokenizer"),
                pool: pool.clone().expect("generate mode has a tokenizer, and so its pool"),
                defaults: Arc::new(config.sampling_defaults.clone()),
                metrics: metrics.clone(),
            }
        }),
        continuation_attempts: config.continuation_attempts,
        keys: KeyHeaders::new(config.session_headers.clone()),
        max_body_bytes: config.max_body_bytes,
        body_budget: crate::ingress::body_budget::BodyBudget::new(
            config.max_buffered_request_bytes,
            Some(metrics.request_bytes_held.clone()),
        ),
        body_read_timeout: config.body_read_timeout,
        metrics: metrics.clone(),
        limiter: config.limit.map(|(n, queued, timeout)| {
            let queue_metrics = crate::admission::fair_queue::QueueMetrics {
                wait: metrics.queue_wait.clone(),
                queued: metrics.queued.clone(),
            };
            crate::admission::Limiter::new(n, queued, timeout, config.queue_order, Some(queue_metrics))
        }),
        api_keys: api_keys.clone(),
        rate_limits: rate_limits.clone(),
        metrics_on_serving: config.metrics_on == crate::config::MetricsOn::Serving,
        forward_authorization: config.forward_authorization,
        trust_client_kv_params: config.trust_client_kv_params,
        forward_paths: config.forward_paths.clone(),
        access_log: config.access_log,
        tracing: tracing.clone(),
    });
    let admin_apart = match (admin_apart, config.metrics_on) {
        (Some(admin), crate::config::MetricsOn::Admin) => {
            Some(admin.merge(ingress::metrics_routes(ingress.clone())))
        }
        (admin, _) => admin,
    };
    let app = ingress::routes(ingress, admin_here);
    let (stop, stopped) = oneshot::channel();
    let limits = ClientLimits {
        header_read: config.header_read_timeout,
        idle: config.client_idle_timeout,
        keep_alive: config.client_keep_alive_timeout,
        connections: config.max_client_connections,
    };
    let scheme = if serving_tls.is_some() { "https" } else { "http" };
    let server = tokio::spawn(accept_loop(
        listener,
        app,
        stopped,
        config.drain_timeout,
        limits,
        serving_tls,
        metrics.clone(),
    ));
    let mut admin_addr = None;
    let mut admin_stop = None;
    if let (Some(listen), Some(routes)) = (config.admin_listen, admin_apart) {
        let listener = TcpListener::bind(listen).await?;
        admin_addr = Some(listener.local_addr()?);
        let routes = routes.layer(axum::middleware::from_fn_with_state(
            crate::admission::ApiKeys::default(),
            crate::admission::admit,
        ));
        let (stop, stopped) = oneshot::channel();
        admin_stop = Some(stop);
        tasks.push(tokio::spawn(accept_loop(
            listener,
            routes,
            stopped,
            Duration::ZERO,
            limits,
            admin_tls,
            metrics.clone(),
        )));
        tracing::info!(addr = %admin_addr.expect("bound"), "admin API listening");
    }
    for sim in &sims {
        tracing::info!(replica = %sim.url(), role = ?sim.state.config.role, model = %sim.state.model,
            "simulated replica started");
    }
    if let Some(prefill) = &prefill_registry {
        tracing::info!(
            prefill = prefill.replicas().len(),
            healthy = prefill.healthy_count(),
            "P/D mode: prefill stage"
        );
    }
    tracing::info!(%addr, scheme, replicas = registry.replicas().len(), healthy = registry.healthy_count(),
        policy = ?config.policy, "router listening");
    Ok(RunningRouter {
        addr,
        admin_addr,
        admin_stop,
        sims,
        metrics,
        registry,
        prefill_registry,
        stop: Some(stop),
        server,
        tracing,
        health: tasks,
        draining,
        shutdown_delay: config.shutdown_delay,
    })
}

/// One stage's registry (probed once before returning), health checker and dispatcher.
async fn stage(
    config: &RouterConfig,
    replicas: Vec<crate::replicas::ReplicaUrl>,
    policy: crate::policy::PolicyKind,
    client: &proxy::HttpClient,
    relay: &crate::upstream::relay::Relay,
    metrics: &Arc<Metrics>,
    pool: &Option<Arc<TokenizePool>>,
) -> (Dispatcher, JoinHandle<()>, HealthChecker) {
    let registry_config = RegistryConfig {
        thresholds: config.thresholds,
        breaker: config.breaker,
        outliers: config.outliers,
        policy,
        hash: config.hash,
        prefix: config.prefix,
        kv: config.kv,
        index: config.index,
        tokenizer: config.tokenizer.clone(),
    };
    let registry = Arc::new(Registry::new(replicas, registry_config, metrics.clone()));
    if let (crate::policy::PolicyKind::KvAware, Some(feed), Some(index)) =
        (policy, &config.kv_events, registry.cache_index())
    {
        let feeds = crate::policy::cache_index::KvFeeds::new(feed.clone(), index.clone(), metrics.clone());
        registry.follow_kv_events(Arc::new(feeds));
    }
    let checker = HealthChecker::new(registry.clone(), client.clone(), config.health);
    checker.probe_all().await;
    // Health checks and, for the policies that use it, the engines' load: one task, so that
    // aborting it at shutdown stops both.
    let health = match (policy, config.engine_load) {
        (crate::policy::PolicyKind::ConsistentHash | crate::policy::PolicyKind::PrefixAware, Some(bound)) => {
            use crate::replicas::engine_load::EngineLoadReader;
            let reader = EngineLoadReader::new(
                registry.clone(),
                client.clone(),
                bound,
                config.health.timeout,
                metrics,
            );
            reader.read_all().await;
            let probes = checker.clone().run();
            tokio::spawn(async move {
                tokio::join!(probes, reader.run());
            })
        }
        _ => tokio::spawn(checker.clone().run()),
    };
    let dispatcher = Dispatcher {
        registry,
        relay: relay.clone(),
        metrics: metrics.clone(),
        timeouts: config.timeouts,
        retries: crate::dispatch::retry_budget::RetryBudget::new(config.retries),
        explain: config.explain_routing,
        tokens: match (policy.uses_tokens(), &config.tokenizer, pool) {
            (true, Some(tokenizer), Some(pool)) => {
                Some(crate::dispatch::PromptTokens { tokenizer: tokenizer.clone(), pool: pool.clone() })
            }
            _ => None,
        },
    };
    (dispatcher, health, checker)
}

fn sim_url(sim: &vllm_sim::RunningSim) -> crate::replicas::ReplicaUrl {
    crate::replicas::ReplicaUrl::parse(&sim.url()).expect("a bound loopback address is a valid URL")
}

/// Time limits on what a client connection may hold the router for, and how many it may
/// hold at once.
#[derive(Debug, Clone, Copy)]
struct ClientLimits {
    /// To send a request's headers (HTTP/1.1), or to finish the TLS handshake.
    header_read: Duration,
    /// To accept any byte of a response it is being sent ([`StallLimited`], and an
    /// HTTP/2 stream's window: [`crate::ingress::h2_streams`]).
    idle: Duration,
    /// With no request in flight ([`crate::ingress::keep_alive`]).
    keep_alive: Duration,
    /// Connections open at once (`--max-client-connections`).
    connections: usize,
}

/// Largest header block an HTTP/2 client may send: what hyper's HTTP/1 buffer holds.
const MAX_H2_HEADER_LIST: u32 = 400 * 1024;
/// Streams one HTTP/2 connection may have open at once.
const MAX_H2_STREAMS: u32 = 256;
/// TLS handshakes under way at once (each costs a signature); more wait their turn,
/// within the header read timeout.
const MAX_TLS_HANDSHAKES: usize = 128;
/// How long a connection sent GOAWAY for its resets has to go before it is closed.
const GOAWAY_GRACE: Duration = Duration::from_millis(500);

/// HTTP/1.1 and HTTP/2 (h2c with prior knowledge, or h2 by ALPN over TLS), with the
/// same limits on both.
fn http_builder(
    limits: ClientLimits,
    metrics: &Metrics,
) -> hyper_util::server::conn::auto::Builder<StreamExecutor> {
    let executor = StreamExecutor {
        limit: limits.idle,
        counters: StreamCounters {
            stalls: metrics.client_stalls.with_label_values(&["stream"]),
            premature_resets: metrics.premature_resets.clone(),
        },
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(executor);
    // Slow clients: headers must arrive in time, and may not exceed hyper's 400 kB
    // buffer (hyper answers 431 beyond it); a client that stops reading loses its
    // connection after the idle limit.
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read);
    // HTTP/2: the same header bound, a bound on streams per connection, and pings
    // that find a peer gone silent. A reset stream (RST_STREAM) drops its request's
    // future, which cancels the upstream request as a closed HTTP/1 connection does;
    // streams the client does not read, and connections that reset streams en masse,
    // are cut off by the stream executor.
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_H2_HEADER_LIST)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(Some(limits.idle))
        .keep_alive_timeout(limits.header_read);
    builder
}

async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    mut stopped: oneshot::Receiver<()>,
    drain_timeout: Duration,
    limits: ClientLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: Arc<Metrics>,
) {
    // Every connection's task holds a receiver; the drain waits for them all to end.
    let (drain, draining) = tokio::sync::watch::channel(false);
    let builder = Arc::new(http_builder(limits, &metrics));
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES));
    let socket_stalls = metrics.client_stalls.with_label_values(&["connection"]);
    loop {
        // At the connection limit, stop accepting until one closes.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
            _ = &mut stopped => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = StallLimited::counted(stream, limits.idle, socket_stalls.clone());
        let (builder, draining, tls, handshakes) =
            (builder.clone(), draining.clone(), tls.clone(), handshakes.clone());
        let (app, metrics) = (app.clone(), metrics.clone());
        let streams = ConnectionStreams::new();
        let scope = streams.clone();
        let task = async move {
            let _permit = permit;
            metrics.client_connections.inc();
            let activity = Activity::new();
            let service = tracked_service(app, activity.clone());
            let limited = Connection {
                activity: &activity,
                streams: &streams,
                draining,
                limits,
                peer,
                metrics: &metrics,
            };
            let served = match tls {
                None => {
                    limited.serve(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
                }
                Some(tls) => {
                    // The ClientHello may take its time; the handshake's work (a signature)
                    // waits its turn among the others in progress.
                    let handshake = async {
                        let hello = tokio_rustls::LazyConfigAcceptor::new(Default::default(), stream).await?;
                        let _turn = handshakes.acquire().await.expect("never closed");
                        hello.into_stream(tls.config().clone()).await
                    };
                    match tokio::time::timeout(limits.header_read, handshake).await {
                        Ok(Ok(stream)) => {
                            let connection =
                                builder.serve_connection(TokioIo::new(stream), service).into_owned();
                            limited.serve(connection).await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "client connection ended with an error");
            }
            metrics.client_connections.dec();
        };
        tokio::spawn(scope.scope(task));
    }
    drop(listener);
    let _ = drain.send(true);
    drop(draining);
    if tokio::time::timeout(drain_timeout, drain.closed()).await.is_err() {
        tracing::warn!(?drain_timeout, "drain timeout reached with requests still in flight");
    }
}

/// What a served client connection is held to: the drain, the keep-alive limit, and
/// GOAWAY for a connection that resets its streams en masse.
struct Connection<'a> {
    activity: &'a Activity,
    streams: &'a ConnectionStreams,
    draining: tokio::sync::watch::Receiver<bool>,
    limits: ClientLimits,
    peer: SocketAddr,
    metrics: &'a Metrics,
}

impl Connection<'_> {
    async fn serve<I, S, B>(
        mut self,
        connection: hyper_util::server::conn::auto::Connection<'static, I, S, StreamExecutor>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
        S::Future: 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
        StreamExecutor: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, B>,
    {
        let mut connection = std::pin::pin!(connection);
        let mut shutting_down = false;
        let mut cut_off_at: Option<tokio::time::Instant> = None;
        loop {
            let cut_off = async {
                match cut_off_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                served = connection.as_mut() => return served,
                _ = self.draining.changed(), if !shutting_down => {
                    connection.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
                () = self.streams.abusive(), if cut_off_at.is_none() => {
                    tracing::debug!(peer = %self.peer, "client connection reset too many streams: GOAWAY");
                    self.metrics.client_goaways.with_label_values(&["premature_resets"]).inc();
                    connection.as_mut().graceful_shutdown();
                    shutting_down = true;
                    cut_off_at = Some(tokio::time::Instant::now() + GOAWAY_GRACE);
                }
                () = cut_off => return Ok(()),
                // With no request in flight, dropping the connection loses nothing.
                () = self.activity.idle_for(self.limits.keep_alive) => {
                    tracing::debug!(peer = %self.peer, "idle client connection closed");
                    return Ok(());
                }
            }
        }
    }
}

/// The router's routes as a hyper service whose requests count as in flight on their
/// connection until their response body ends ([`crate::ingress::keep_alive`]); an
/// HTTP/2 stream's response is watched for a client that takes none of it
/// ([`crate::ingress::h2_streams`]).
fn tracked_service(
    app: axum::Router,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let in_flight = activity.begin();
        let app = app.clone();
        async move {
            let response = tower::ServiceExt::oneshot(app, request.map(axum::body::Body::new)).await?;
            Ok(response.map(|body| crate::ingress::h2_streams::watched_body(body, in_flight)))
        }
    })
}

pub use llm_common::signals::shutdown_signal;
