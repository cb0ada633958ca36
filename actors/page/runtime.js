// webpool in-page runtime: creates onnxruntime-web sessions from model bytes served by the
// browser actor's loopback server, and runs them on tensors that cross as base64.
//
// Everything the actor sends arrives as evaluate() *arguments* (data), never as JavaScript source.
// Tensors cross as {dtype, dims, b64}; large bodies (model bytes) are fetched over same-origin HTTP,
// never through the Playwright protocol (it is quadratic in message size).

// onnxruntime-web comes in two builds here: the lean one drives the wasm backend, the full one (JSEP) also
// WebGPU and WebNN. A page imports the lean build as it opens, and the full one only once a model is loaded
// on WebGPU or WebNN: its WebAssembly is twice the size (28 vs 14 MB to compile) and built with Asyncify,
// which costs every run (docs/facts.md). A session, and the tensors fed to it, belong to one build.
const ORT_BUILDS = { lean: "./ort/ort.wasm.min.mjs", full: "./ort/ort.min.mjs" };
const runtimes = new Map();   // build -> the promise of its module, configured

const BASE = new URL(".", import.meta.url).href;
const DTYPES = {
  float32: Float32Array,
  int64: BigInt64Array,
  int32: Int32Array,
  uint8: Uint8Array,
  bool: Uint8Array,
};

const sessions = new Map();   // model key -> {session, backend, inputNames, outputNames, queue}
// model key -> its bytes, fetched ahead without a session (a spare process holding a big model: `stage`)
const staged = new Map();
const states = new Map();     // state id -> {model key, tensors: Map(inputName -> ort.Tensor)}
let capabilities = null;
let gpuDeviceLost = null;     // {reason, message} once WebGPU reports the device lost
let gpuDeviceLostReport = new Promise(() => {});   // settles when the current device's loss is recorded
// A GPU process that dies mid-run fails the run a moment before WebGPU reports the device lost.
const DEVICE_LOST_GRACE_MS = 1000;
const faults = { corrupt: 0, ballast: [] };   // fault injection (tests, benchmarks, CLI)
let runsStarted = 0;          // model runs this page has started (health reports it)

// An error the request caused, in a page that is fine: the actor turns it into an InputError. Any
// other error a call ends in is the browser's (recovered by the pool): a request is blamed only when
// the runtime says so.
class RequestError extends Error {
  constructor(message) {
    super(message);
    this.name = "RequestError";
  }
}

// onnxruntime's status codes that mean the caller's feeds or model were wrong (ORT_INVALID_ARGUMENT,
// ORT_INVALID_PROTOBUF, ORT_INVALID_GRAPH); onnxruntime-web puts the code into the message.
const ORT_REQUEST_ERROR = /ERROR_CODE: (2|7|10)\b/;

function b64ToBytes(b64) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(b64);
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function bytesToB64(bytes) {
  if (bytes.toBase64) return bytes.toBase64();
  let bin = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(bin);
}

function toTensor(ort, name, spec) {
  const Ctor = DTYPES[spec.dtype];
  if (!Ctor) throw new RequestError(`input ${name}: unsupported dtype ${spec.dtype}`);
  const bytes = b64ToBytes(spec.b64);
  const count = spec.dims.reduce((a, b) => a * b, 1);
  if (bytes.byteLength !== count * Ctor.BYTES_PER_ELEMENT) {
    throw new RequestError(`input ${name}: ${bytes.byteLength} bytes do not fit dims ${spec.dims} of ${spec.dtype}`);
  }
  // Copy into an aligned buffer: base64 output is not guaranteed to be aligned for 8-byte types.
  const data = new Ctor(count);
  new Uint8Array(data.buffer).set(bytes);
  return new ort.Tensor(spec.dtype, data, spec.dims);
}

function fromTensor(tensor) {
  const data = tensor.data;
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return { dtype: tensor.type, dims: Array.from(tensor.dims), b64: bytesToB64(bytes) };
}

// A module of one function, (func (result v128) v128.const 0): it validates only where WebAssembly has SIMD.
const SIMD_PROBE_MODULE = "AGFzbQEAAAABBQFgAAF7AwIBAAoWARQA/QwAAAAAAAAAAAAAAAAAAAAACw==";

async function probeCapabilities() {
  const caps = ["wasm"];
  const detail = {
    crossOriginIsolated: self.crossOriginIsolated,
    userAgent: navigator.userAgent,
    cores: navigator.hardwareConcurrency,
    // Threads need shared memory, which a page has only when cross-origin isolated (our page server's
    // headers make it so); onnxruntime-web runs one thread otherwise, whatever it is asked.
    threads: self.crossOriginIsolated === true && typeof SharedArrayBuffer === "function",
    simd: WebAssembly.validate(b64ToBytes(SIMD_PROBE_MODULE)),
  };
  if (navigator.gpu) {
    try {
      const adapter = await navigator.gpu.requestAdapter();
      if (adapter) {
        caps.push("webgpu");
        const info = adapter.info || {};
        detail.webgpu = { vendor: info.vendor || "", architecture: info.architecture || "", description: info.description || "" };
      }
    } catch (e) {
      detail.webgpuError = String(e);
    }
  }
  if (navigator.ml && navigator.ml.createContext) {
    try {
      await navigator.ml.createContext();
      caps.push("webnn");
    } catch (e) {
      detail.webnnError = String(e);
    }
  } else {
    detail.webnnError = "navigator.ml is not exposed";
  }
  return { backends: caps, detail };
}

// A one-node ONNX model (opset 17: y = Identity(x), x a float[1]), 65 bytes. Creating a session of it
// makes onnxruntime-web fetch, compile and instantiate its WebAssembly and set up its runtime, once per
// page (docs/facts.md), which the first real model's session would otherwise pay.
const RUNTIME_WARM_UP_MODEL = "CAg6NwoQCgF4EgF5IghJZGVudGl0eRIBdFoPCgF4EgoKCAgBEgQKAggBYg8KAXkSCgoICAESBAoCCAFCBAoAEBE=";

let setUpWith = null;                    // the options of the page's one set-up (setUp), once it began
let runtimeLoaded = null;                // its probe and the lean build's import: init waits for them
let runtimeReady = Promise.resolve();    // and the lean build's warm-up (ms, or null if it failed)

// The build that drives `backend`, imported (once) and configured with the page's thread count.
function runtimeFor(backend) {
  const build = backend === "wasm" ? "lean" : "full";
  if (!runtimes.has(build)) {
    runtimes.set(build, import(ORT_BUILDS[build]).then((ort) => {
      ort.env.wasm.wasmPaths = BASE + "ort/";
      ort.env.wasm.numThreads = setUpWith.numThreads;
      ort.env.logLevel = "error";
      return ort;
    }));
  }
  return runtimes.get(build);
}

async function warmRuntime(ort) {
  const session = await ort.InferenceSession.create(b64ToBytes(RUNTIME_WARM_UP_MODEL), { executionProviders: ["wasm"] });
  await session.release();
}

// Probe the backends, import the lean build and start setting its WebAssembly up; once per page (the page
// opened with ?threads=N began it already). A failed warm-up is not the page's end: the first model's
// session sets the runtime up itself; a failed import is (init rejects).
export function setUp(options) {
  if (setUpWith === null) {
    setUpWith = { numThreads: options.numThreads };
    const t0 = performance.now();
    const lean = runtimeFor("wasm");
    runtimeLoaded = Promise.all([probeCapabilities().then((c) => { capabilities = c; }), lean]);
    runtimeReady = lean.then(warmRuntime).then(() => performance.now() - t0, () => null);
  }
  return runtimeLoaded;
}

// The page's capabilities once the runtime is imported. `options.warmRuntime`: "wait" also waits for its
// warm-up (a spare process: it must be ready when taken, and reports runtimeWarmUpMs); otherwise the
// warm-up goes on after the answer (a model load waits for it).
export async function init(options) {
  if (setUpWith !== null && setUpWith.numThreads !== options.numThreads) {
    throw new Error(`the runtime was set up with ${setUpWith.numThreads} thread(s), not ${options.numThreads}`);
  }
  await setUp(options);
  if (options.warmRuntime === "wait") return { ...capabilities, runtimeWarmUpMs: await runtimeReady };
  return capabilities;
}

const loading = new Map();    // model key -> the load under way (a second load of the key joins it)

// Idempotent: a key names its content, so loading a model the page already holds on that backend
// answers at once (a load whose answer was lost with a connection is retried after a reconnect).
export async function load(key, url, backend) {
  if (loading.has(key)) await loading.get(key).catch(() => undefined);
  const held = sessions.get(key);
  if (held) {
    if (held.backend !== backend) {
      throw new RequestError(`model ${key} is already loaded on ${held.backend}, not ${backend}`);
    }
    return { fetchMs: 0, createMs: 0, bytes: 0, alreadyLoaded: true,
             inputNames: held.inputNames, outputNames: held.outputNames };
  }
  if (!capabilities.backends.includes(backend)) {
    throw new RequestError(`backend ${backend} is not available in this browser (has ${capabilities.backends})`);
  }
  const pending = loadNow(key, url, backend);
  loading.set(key, pending);
  try {
    return await pending;
  } finally {
    loading.delete(key);
  }
}

async function fetchModel(key, url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`fetching model ${key}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function loadNow(key, url, backend) {
  const t0 = performance.now();
  const wasStaged = staged.has(key);
  const bytes = wasStaged ? staged.get(key) : await fetchModel(key, url);
  staged.delete(key);     // the session holds the model now (or the load failed: fetched afresh next time)
  const t1 = performance.now();
  await runtimeReady;     // being set up since the page opened; the bytes were fetched meanwhile
  const t2 = performance.now();
  const session = await createSession(key, bytes, backend);   // a first WebGPU/WebNN model imports the full build
  return { fetchMs: t1 - t0, runtimeWaitMs: t2 - t1, createMs: performance.now() - t2, bytes: bytes.byteLength,
           staged: wasStaged, inputNames: session.inputNames, outputNames: session.outputNames };
}

// Fetch a model's bytes and keep them, without a session: a spare process does this for models too big to
// hold twice as sessions, so that once it is taken, loading the model skips the fetch (1.4 s for SmolLM2's
// 540 MB here). Idempotent per key, like `load`.
export async function stage(key, url) {
  const held = () => staged.has(key) || sessions.has(key) || loading.has(key);
  if (held()) return { fetchMs: 0, bytes: 0, alreadyHeld: true };
  const t0 = performance.now();
  const bytes = await fetchModel(key, url);
  // A load of the key that began meanwhile (the spare was taken mid-fetch) fetched its own: keep no second copy.
  if (held()) return { fetchMs: performance.now() - t0, bytes: 0, alreadyHeld: true };
  staged.set(key, bytes);
  return { fetchMs: performance.now() - t0, bytes: bytes.byteLength };
}

export function unstage(key) {
  return staged.delete(key);
}

// onnxruntime rejects a feed of the wrong type or shape (or bytes that are no model) with a status
// code in its message; input names were checked before (checkInputNames).
function asRequestError(err) {
  const message = String((err && err.message) || err);
  if (ORT_REQUEST_ERROR.test(message)) {
    return new RequestError(message);
  }
  return err;
}

// onnxruntime's graph optimisations, per backend. On wasm they cost more than they give, measured (docs/facts.md):
// with "disabled" instead of "all", SmolLM2's session is created in 2.3 s instead of 2.9 s, holds 200 MB less and
// decodes as fast; MiniLM's is created in 0.33 s instead of 0.45 s and runs 8 sentences in 86 ms instead of 104.
// WebGPU and WebNN keep "all": not measured on a GPU here.
const GRAPH_OPTIMIZATION = { wasm: "disabled", webgpu: "all", webnn: "all" };

async function createSession(key, bytes, backend) {
  const ort = await runtimeFor(backend);
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, {
      executionProviders: [backend],
      graphOptimizationLevel: GRAPH_OPTIMIZATION[backend] || "all",
    });
  } catch (err) {
    throw asRequestError(err);
  }
  if (backend === "webgpu" && ort.env.webgpu.device) {
    const device = await ort.env.webgpu.device;
    gpuDeviceLostReport = device.lost.then((info) => { gpuDeviceLost = { reason: info.reason, message: info.message }; });
  }
  sessions.set(key, {
    session, backend, ort,
    inputNames: session.inputNames, outputNames: session.outputNames,
    queue: Promise.resolve(),
  });
  return session;
}

// Run one step of a model. `feeds` maps input names to tensors; `opts.state` names a per-request state
// (e.g. a generation's KV cache) kept in the page: inputs listed in `opts.statePairs` ([output, input])
// are taken from the state and refreshed from the outputs after the run, so the cache never crosses the
// page boundary. `opts.initialState` starts the state afresh (replacing any state of that name).
export function run(key, feeds, opts, deadline = null) {
  const entry = sessions.get(key);
  if (!entry) return Promise.reject(new RequestError(`model ${key} is not loaded`));
  if (entry.backend === "webgpu" && gpuDeviceLost) return Promise.reject(deviceLostError());
  // One run at a time per session: onnxruntime-web sessions are not reentrant. A run whose turn comes
  // after its caller's deadline is not started (see `call`).
  const result = entry.queue.then(() => {
    if (expired(deadline)) throw deadlineError();
    return runNow(entry, key, feeds, opts);
  });
  entry.queue = result.catch(() => undefined);
  return result;
}

function expired(deadline) {
  return deadline !== null && deadline !== undefined && performance.timeOrigin + performance.now() > deadline;
}

function deadlineError() {
  const err = new Error("the caller's deadline passed before the call started");
  err.name = "DeadlineExceeded";
  return err;
}

function deviceLostError() {
  const err = new Error(`WebGPU device lost (${gpuDeviceLost.reason}): ${gpuDeviceLost.message}`);
  err.name = "DeviceLostError";
  return err;
}

// The request names exactly the model's inputs: checked here, so a wrong name is the request's error
// by the page's own word, not read out of onnxruntime's message.
function checkInputNames(session, inputs) {
  const missing = session.inputNames.filter((n) => !(n in inputs));
  const unknown = Object.keys(inputs).filter((n) => !session.inputNames.includes(n));
  if (missing.length || unknown.length) {
    throw new RequestError(`inputs do not match the model's (${session.inputNames.join(", ")}): ` +
      `missing ${missing.join(", ") || "none"}; unknown ${unknown.join(", ") || "none"}`);
  }
}

async function runNow(entry, key, feeds, opts) {
  const t0 = performance.now();
  runsStarted += 1;
  const inputs = {};
  for (const [name, spec] of Object.entries(feeds)) inputs[name] = toTensor(entry.ort, name, spec);
  let state = null;
  if (opts.state) {
    if (opts.initialState) dropState(opts.state);
    state = states.get(opts.state);
    if (!state) {
      state = { key, tensors: new Map() };
      for (const [name, spec] of Object.entries(opts.initialState || {})) {
        state.tensors.set(name, toTensor(entry.ort, name, spec));
      }
      states.set(opts.state, state);
    } else if (state.key !== key) {
      throw new RequestError(`state ${opts.state} belongs to model ${state.key}, not ${key}`);
    }
    for (const [name, tensor] of state.tensors) inputs[name] = tensor;
  }
  checkInputNames(entry.session, inputs);
  let outputs;
  try {
    const running = entry.session.run(inputs);
    running.catch(() => undefined);      // if the race below is lost, its later failure is nobody's
    // On WebGPU a run in flight when the device is lost may never settle: the loss ends it.
    outputs = await (entry.backend === "webgpu"
      ? Promise.race([running, gpuDeviceLostReport.then(() => { throw deviceLostError(); })])
      : running);
  } catch (err) {
    // Give a device loss the moment it takes to be reported, so the failure is classified by its cause
    // (the device, recovered by the pool) and not as a bad request.
    if (entry.backend === "webgpu" && !gpuDeviceLost) {
      await Promise.race([gpuDeviceLostReport, new Promise((r) => setTimeout(r, DEVICE_LOST_GRACE_MS))]);
    }
    if (entry.backend === "webgpu" && gpuDeviceLost) throw deviceLostError();
    throw asRequestError(err);
  }
  if (state) {
    for (const [outName, inName] of opts.statePairs) {
      const old = state.tensors.get(inName);
      state.tensors.set(inName, outputs[outName]);
      if (old && old.dispose) old.dispose();
    }
  }
  const fetched = {};
  for (const name of opts.fetch || entry.outputNames) {
    if (faults.corrupt) corrupt(outputs[name].data, faults.corrupt);
    fetched[name] = fromTensor(outputs[name]);
  }
  return { outputs: fetched, ms: performance.now() - t0 };
}

// Fault injection: make this browser return wrong numbers (a dissenter for voting tests), or right ones again
// (variant 0). Browsers given different variants also disagree with each other (a vote with no majority): floats
// change sign and scale, integers (a generation's top-k token ids) have their two lowest bits flipped by the
// variant (1-3), so ids stay in a vocabulary whose size is a multiple of 4.
function corrupt(data, variant) {
  if (data instanceof BigInt64Array) {
    const flip = BigInt(variant);
    for (let i = 0; i < data.length; i++) data[i] ^= flip;
  } else if (data instanceof Float32Array) {
    for (let i = 0; i < data.length; i++) data[i] = data[i] * -0.5 * variant + 0.01 * ((i * 7919) % 13);
  } else if (data instanceof Int32Array) {
    for (let i = 0; i < data.length; i++) data[i] ^= variant;
  }
}

export function setCorrupt(variant) {
  faults.corrupt = variant;
  return faults.corrupt;
}

// Fault injection: hold `mb` MiB of touched memory (real resident pages), as a leak would.
export function allocateBallast(mb) {
  for (let i = 0; i < mb; i++) faults.ballast.push(new Uint8Array(1 << 20).fill(1 + (i % 250)));
  return faults.ballast.length;
}

export function dropState(id) {
  const state = states.get(id);
  if (!state) return false;
  for (const tensor of state.tensors.values()) if (tensor.dispose) tensor.dispose();
  states.delete(id);
  return true;
}

export async function unload(key) {
  staged.delete(key);
  const entry = sessions.get(key);
  if (!entry) return false;
  for (const [id, state] of states) if (state.key === key) dropState(id);
  await entry.queue;
  await entry.session.release();
  sessions.delete(key);
  return true;
}

// The one entry the actor calls: ``name`` of an exported function and its arguments, both data. The
// answer is an envelope, so the actor can tell the runtime's own errors (typed, by name) from a call
// the browser never finished (Playwright raises for those): {value} or {error: {name, message}}.
const API = { init, load, stage, unstage, run, dropState, unload, health, settled, setCorrupt, allocateBallast };

// `deadline` (ms since the epoch, the actor's clock: same host) is when the actor stops waiting. A call
// that starts after it has no caller left: when a hung script is terminated, the calls queued behind it
// would otherwise all run for nobody, holding up the page's recovery by their whole run time.
export async function call(name, args, deadline = null) {
  const fn = Object.hasOwn(API, name) ? API[name] : null;
  try {
    if (!fn) throw new RequestError(`no runtime function ${String(name).slice(0, 80)}`);
    if (expired(deadline)) throw deadlineError();
    return { value: await (fn === run ? run(...args, deadline) : fn(...args)) };
  } catch (err) {
    const isError = err instanceof Error;
    return { error: { name: isError ? err.name : "Error", message: isError ? err.message : String(err) } };
  }
}

// After the actor terminated a hung script: has every model's run queue settled within `waitMs`? A run
// cut off mid-way by the termination never settles (its finally blocks never run), and every later run of
// that model would wait behind it: then this page cannot be resumed and the pool replaces it.
export async function settled(waitMs) {
  const queues = Promise.all(Array.from(sessions.values(), (e) => e.queue)).then(() => true);
  const timer = new Promise((resolve) => setTimeout(() => resolve(false), waitMs));
  return { settled: await Promise.race([queues, timer]), models: Array.from(sessions.keys()) };
}

export function health() {
  const mem = performance.memory || {};
  return {
    models: Array.from(sessions.keys()),
    staged: Array.from(staged.keys()),
    backends: Object.fromEntries(Array.from(sessions, ([k, v]) => [k, v.backend])),
    states: Array.from(states.keys()),
    jsHeapBytes: mem.usedJSHeapSize || 0,
    gpuDeviceLost,
    runsStarted,
    capabilities,
  };
}
