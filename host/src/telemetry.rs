//! Logging: one init function, text or JSON, quiet wasmtime/cranelift/hyper;
//! with the `otel` cargo feature, the spans can also be exported over
//! OTLP/HTTP.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The log format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,wasmtime=warn,cranelift=warn,cranelift_codegen=warn,hyper=warn")
    })
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn fmt_layer(format: LogFormat) -> BoxedLayer {
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not for a log file or journald.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    }
}

/// Install the global subscriber. `RUST_LOG` overrides the default filter.
pub fn init(format: LogFormat) {
    let result = tracing_subscriber::registry()
        .with(fmt_layer(format).with_filter(filter()))
        .try_init();
    // A subscriber already set (tests) is fine.
    drop(result);
}

/// Flushes and stops the OpenTelemetry exporter when dropped.
#[cfg(feature = "otel")]
pub struct OtelGuard(opentelemetry_sdk::trace::SdkTracerProvider);

#[cfg(feature = "otel")]
impl Drop for OtelGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("warning: stopping the OpenTelemetry exporter: {e}");
        }
    }
}

/// [`init`], and export every span (filtered as the logs are) over
/// OTLP/HTTP to `OTEL_EXPORTER_OTLP_ENDPOINT` (default
/// `http://localhost:4318`), as service `heartgate`.
#[cfg(feature = "otel")]
pub fn init_with_otel(format: LogFormat) -> anyhow::Result<OtelGuard> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Ok(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        exporter = exporter.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
    }
    let exporter = exporter.build()?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("heartgate")
                .build(),
        )
        .build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("heartgate"));
    tracing_subscriber::registry()
        .with(fmt_layer(format).with_filter(filter()))
        .with(otel.with_filter(filter()))
        .try_init()?;
    Ok(OtelGuard(provider))
}
