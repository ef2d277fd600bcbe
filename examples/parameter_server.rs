//! A parameter server trained by several worker processes: distrpc's main job.
//!
//! `cargo run --release --example parameter_server [-- TRAINERS STEPS]`
//!
//! This process is the parameter server `ps` (rank 0): it hosts the rendezvous store, holds the
//! weights of a linear model, and starts TRAINERS trainer processes (ranks 1..) by running this
//! same program. Each trainer makes its own synthetic regression data, and for STEPS steps
//! fetches the weights (`rpc_sync`), computes the squared-error gradient with ndarray, and
//! pushes it (`rpc_async`); the server applies SGD. Everyone then shuts down together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use distrpc::launch::Launch;
use distrpc::{Function, Rpc, RpcOptions, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array1, Array2, ArrayView1, Ix1};

const FEATURES: usize = 64;
const BATCH: usize = 256;
const LEARNING_RATE: f32 = 0.05;

/// The server's functions, registered at init as closures over its state.
fn get_weights() -> Function<(), Tensor> {
    Function::named("ps::get_weights")
}
fn push_gradient() -> Function<(Tensor, f32), u64> {
    Function::named("ps::push_gradient")
}

/// splitmix64, so that every trainer's data is reproducible from its rank.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// The model every trainer's data comes from: the weights the server should find.
fn true_weights() -> Array1<f32> {
    let mut rng = Rng(42);
    Array1::from_shape_fn(FEATURES, |_| rng.next())
}

struct Server {
    weights: Mutex<Array1<f32>>,
    version: AtomicU64,
    calls: AtomicU64,
    last_loss: Mutex<f32>,
    first_loss: Mutex<Option<f32>>,
}

fn main() -> anyhow::Result<()> {
    match std::env::var("RANK") {
        Ok(rank) => trainer(rank.parse().context("RANK")?),
        Err(_) => server(),
    }
}

fn server() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let trainers: usize = args
        .next()
        .map_or(Ok(3), |a| a.parse())
        .context("TRAINERS")?;
    let steps: u64 = args
        .next()
        .map_or(Ok(2000), |a| a.parse())
        .context("STEPS")?;
    ensure!(trainers > 0, "at least one trainer");
    let started = Instant::now();
    let state = Arc::new(Server {
        weights: Mutex::new(Array1::zeros(FEATURES)),
        version: AtomicU64::new(0),
        calls: AtomicU64::new(0),
        last_loss: Mutex::new(f32::NAN),
        first_loss: Mutex::new(None),
    });
    let bar = ProgressBar::new(trainers as u64 * steps).with_style(
        ProgressStyle::with_template(
            "{spinner} training [{bar:40}] {pos}/{len} steps  loss {msg}  {elapsed}",
        )?
        .progress_chars("=> "),
    );
    let (s1, s2, b) = (state.clone(), state.clone(), bar.clone());
    let options = RpcOptions::default()
        .init_method("tcp://127.0.0.1:0")
        .register("ps::get_weights", move |(): ()| {
            s1.calls.fetch_add(1, Ordering::Relaxed);
            Tensor::from(s1.weights.lock().expect("weights lock").clone())
        })
        .register_fallible("ps::push_gradient", move |(grad, loss): (Tensor, f32)| {
            s2.calls.fetch_add(1, Ordering::Relaxed);
            let grad = grad
                .view::<f32>()?
                .into_dimensionality::<Ix1>()
                .map_err(|e| anyhow::anyhow!(e))?
                .to_owned();
            *s2.weights.lock().expect("weights lock") -= &(grad * LEARNING_RATE);
            *s2.last_loss.lock().expect("loss lock") = loss;
            s2.first_loss.lock().expect("loss lock").get_or_insert(loss);
            b.inc(1);
            b.set_message(format!("{loss:.5}"));
            Ok::<_, anyhow::Error>(s2.version.fetch_add(1, Ordering::Relaxed) + 1)
        });

    // Bind first to learn the store's port, then start the trainers, then meet them.
    let pending = Rpc::bind("ps", 0, trainers + 1, options)?;
    let port = pending
        .store_addr()
        .context("the server hosts a TCP store")?
        .port();
    let exe = std::env::current_exe()?;
    let group = Launch::new(trainers, exe)
        .first_rank(1)
        .master_port(port)
        .env("STEPS", steps.to_string())
        .spawn()?;
    let rpc = pending.join()?;
    bar.enable_steady_tick(Duration::from_millis(100));
    // Serves the trainers until every one of them has shut down too.
    rpc.shutdown()?;
    bar.finish();
    group.wait()?;

    let w = state.weights.lock().expect("weights lock").clone();
    let distance = (&w - &true_weights()).mapv(|x| x * x).sum().sqrt();
    let calls = state.calls.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "parameter server: final loss {:.5} (first {:.3}), weights within {distance:.4} of the truth, \
         {} updates from {trainers} trainers, {calls} calls, {secs:.2} s wall ({:.0} calls/s)",
        *state.last_loss.lock().expect("loss lock"),
        state
            .first_loss
            .lock()
            .expect("loss lock")
            .unwrap_or(f32::NAN),
        state.version.load(Ordering::Relaxed),
        calls as f64 / secs,
    );
    ensure!(distance < 0.5, "training did not converge");
    Ok(())
}

fn trainer(rank: usize) -> anyhow::Result<()> {
    let steps: u64 = std::env::var("STEPS").context("STEPS")?.parse()?;
    let rpc = Rpc::init(&format!("trainer{rank}"), None, None, RpcOptions::default())?;
    let mut rng = Rng(rank as u64 * 7919);
    let truth = true_weights();
    let x = Array2::from_shape_fn((BATCH, FEATURES), |_| rng.next());
    let y = x.dot(&truth) + Array1::from_shape_fn(BATCH, |_| 0.01 * rng.next());
    let mut pushed = None;
    for _ in 0..steps {
        let w = rpc.rpc_sync("ps", get_weights(), ())?;
        let w: ArrayView1<f32> = w.view::<f32>()?.into_dimensionality()?;
        let residual = x.dot(&w) - &y;
        let loss = residual.mapv(|r| r * r).mean().unwrap_or(0.0);
        let grad = x.t().dot(&residual) * (2.0 / BATCH as f32);
        // Push without waiting; wait for the previous push before the next, keeping one in flight.
        if let Some(prev) =
            pushed.replace(rpc.rpc_async("ps", push_gradient(), (Tensor::from(grad), loss)))
        {
            distrpc::RpcFuture::wait(prev)?;
        }
    }
    if let Some(last) = pushed {
        last.wait()?;
    }
    rpc.shutdown()?;
    Ok(())
}
