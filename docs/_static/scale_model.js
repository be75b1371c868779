// The scale model of cai_labs.scale, line for line, for the calculator page (no server).
// Presets come from docs/_static/generated/scale_presets.js, written from Python at build time;
// tests/test_scale_js.py and tests/browser compare this file with Python on random configs.
(function (root) {
  "use strict";
  const fl = Math.floor;

  function gridShape(mode, size, depth) {
    if (mode === "1d") return [size];
    if (mode === "2d") {
      const q = Math.round(Math.sqrt(size));
      if (q * q !== size) throw new Error(`2D tensor parallelism needs a square world size (q*q ranks); got ${size}`);
      return [q, q];
    }
    if (mode === "2.5d") {
      const q = Math.round(Math.sqrt(size / depth));
      if (size % depth || q * q * depth !== size) throw new Error(`2.5D tensor parallelism needs q*q*d ranks; got ${size} ranks with depth d=${depth}`);
      return [depth, q, q];
    }
    if (mode === "3d") {
      const q = Math.round(Math.cbrt(size));
      if (q * q * q !== size) throw new Error(`3D tensor parallelism needs a cube world size (q*q*q ranks); got ${size}`);
      return [q, q, q];
    }
    throw new Error(`unknown tensor parallel mode ${mode}`);
  }
  function dims(mode, size, depth) {
    const s = gridShape(mode, size, depth);
    return [s[s.length - 1], mode === "2.5d" ? s[0] : 1];
  }

  // tensor_parallel.formulas.linear_cost: [param_bytes, comm_bytes, comm_calls]
  function linearCost(mode, size, M, K, N, depth, bias, kind, elem) {
    const [q, d] = dims(mode, size, depth);
    const nb = bias ? N : 0;
    if (mode === "1d") {
      const P = size, on = P > 1 ? 1 : 0;
      if (kind === "column") return [fl((K * N + nb) / P) * elem, M * K * elem * on, on];
      return [(fl((K * N) / P) + nb) * elem, M * N * elem * on, on];
    }
    if (mode === "2d" || mode === "2.5d") {
      const xb = fl((M * K) / (d * q * q)), ab = fl((K * N) / (q * q));
      let comm = q > 1 ? 3 * q * (xb + ab) : 0, calls = q > 1 ? 6 * q : 0;
      if (bias && q > 1) { comm += fl(N / q); calls += 1; }
      if (d > 1) {
        comm += ab; calls += 1;
        if (bias) { comm += fl(N / q); calls += 1; }
      }
      return [(ab + fl(nb / q)) * elem, comm * elem, calls];
    }
    let comm = q > 1 ? fl((3 * M * K + 3 * K * N + 2 * M * N) / (q * q)) : 0, calls = q > 1 ? 8 : 0;
    if (bias && q > 1) { comm += 2 * fl(N / q); calls += 2; }
    return [(fl((K * N) / q ** 3) + fl(nb / q)) * elem, comm * elem, calls];
  }

  // tensor_parallel.formulas.layer_activation_bytes
  function layerActivation(seq, b, h, a, tp, sp, recompute, ffn, kv, gated, dropout, elem, kvSeq) {
    const sbh = seq * b * h, splitSeq = sp ? tp : 1;
    if (recompute === "full") return (elem * sbh) / splitSeq;
    const g = kv / a;
    const unsplit = 4 * elem * sbh + (dropout ? 2 * sbh : 0);
    const split = elem * sbh * (2 + 2 * g) + elem * seq * b * ffn * (gated ? 3 : 2);
    let total = unsplit / splitSeq + split / tp;
    if (recompute === "none") total += (a * seq * kvSeq * b * (dropout ? 2 * elem + 1 : elem)) / tp;
    return total;
  }

  function bubbleFraction(schedule, p, m, v) {
    const c = schedule === "interleaved" ? v : 1;
    return (p - 1) / (c * m + p - 1);
  }
  function inFlight(schedule, p, m, v) {
    if (schedule === "gpipe") return m;
    if (schedule === "1f1b") return Math.min(p, m);
    return Math.min(p * (1 + (p - 1) / (p * v)), m);
  }
  function zeroMemory(numel, stage, n, pb, gb, ob) {
    const params = (numel * pb) / (stage >= 3 ? n : 1);
    const grads = (numel * gb) / (stage >= 2 ? n : 1);
    const optim = (numel * ob) / (stage >= 1 ? n : 1);
    return { params, grads, optimizer: optim };
  }
  const zeroSentFactor = (stage, n) => ((stage === 3 ? 3 : 2) * (n - 1)) / n;
  const ringAllreduce = (bytes, n) => (2 * (n - 1) / n) * bytes;

  // ---- the model shape (scale/models.py) ----
  const F = (m) => (m.ffn == null ? 4 * m.hidden : m.ffn);
  const KV = (m) => (m.kv_heads == null ? m.heads : m.kv_heads);
  const headDim = (m) => fl(m.hidden / m.heads);
  const qkvOut = (m) => m.hidden + 2 * KV(m) * headDim(m);
  const isTransformer = (m) => m.params == null;
  const matmulParams = (m) => m.hidden * qkvOut(m) + m.hidden * m.hidden + (m.gated ? 3 : 2) * m.hidden * F(m);
  const embeddingParams = (m) => m.vocab * m.hidden + (m.learned_positions ? m.seq * m.hidden : 0);
  const headParams = (m) => (m.bias ? 2 * m.hidden : m.hidden) + (m.tied ? 0 : m.vocab * m.hidden);
  function forwardFlopsPerToken(m, seq) {
    if (!isTransformer(m)) return m.forward_flops;
    return m.layers * (2 * matmulParams(m) + 4 * seq * m.hidden) + 2 * m.hidden * m.vocab;
  }

  const STATE = { bf16: [2, 2, 12], fp32: [4, 4, 8] };
  const elemBytes = (L) => (L.precision === "bf16" ? 2 : 4);
  const seqLen = (m, L) => (L.seq == null ? m.seq : L.seq);
  const nMicro = (L) => (L.microbatches != null ? L.microbatches : L.global_batch == null ? 1 : fl(L.global_batch / (L.dp * L.micro_batch_size)));
  const gpusOf = (L) => L.dp * L.tp * L.pp * L.sp;
  const layersPerStage = (m, L) => Math.ceil(m.layers / L.pp);

  function layerCost(m, L, rows) {
    const h = m.hidden, e = elemBytes(L), fc1 = m.gated ? 2 * F(m) : F(m);
    const lin = [[h, qkvOut(m), "column"], [h, h, "row"], [h, fc1, "column"], [F(m), h, "row"]];
    let p = 0, c = 0, calls = 0;
    for (const [k, n, kind] of lin) {
      const r = linearCost(L.tp_mode, L.tp, rows, k, n, L.tp_depth, m.bias, kind, e);
      p += r[0]; c += r[1]; calls += r[2];
    }
    const norm = 2 * (m.bias ? 2 * h : h) * e;
    const side = gridShape(L.tp_mode, L.tp, L.tp_depth).slice(-1)[0];
    p += L.tp_mode === "1d" ? norm : fl(norm / side);
    return [p, c, calls];
  }

  function paramsPerGpu(m, L) {
    if (!isTransformer(m)) return m.params;
    const perLayer = layerCost(m, L, L.micro_batch_size * seqLen(m, L))[0];
    const body = fl((layersPerStage(m, L) * perLayer) / elemBytes(L));
    // Words split over TP (vocabulary-parallel); positions and the final norm replicated.
    const words = m.vocab * m.hidden;
    const embed = fl(words / L.tp) + embeddingParams(m) - words;
    let head = headParams(m) - (m.tied ? 0 : words);
    if (L.pp > 1 || !m.tied) head += fl(words / L.tp);
    return body + (L.pp === 1 ? embed + head : Math.max(embed, head));
  }

  function activationBytes(m, L) {
    if (!isTransformer(m)) return 0;
    const seq = seqLen(m, L), b = L.micro_batch_size, e = elemBytes(L);
    const sp = L.sequence_parallel || L.tp_mode !== "1d";
    const layer = (rec) => layerActivation(fl(seq / L.sp), b, m.hidden, m.heads, L.tp, sp, rec, F(m), KV(m), m.gated, m.dropout, e, seq);
    const flight = L.pp > 1 ? inFlight(L.schedule, L.pp, nMicro(L), L.chunks) : 1;
    let stage = layersPerStage(m, L) * layer(L.recompute) * flight;
    if (L.recompute === "full") stage += layer("none");
    return stage + (4 * b * fl(seq / L.sp) * m.vocab) / L.tp;
  }

  function memoryPerGpu(m, L) {
    const [pb, gb, ob] = STATE[L.precision];
    const s = zeroMemory(paramsPerGpu(m, L), L.zero, L.dp * L.sp, pb, gb, ob);
    let host = 0;
    if (L.offload) { host = s.optimizer; s.optimizer = 0; }
    const act = activationBytes(m, L);
    return { params: s.params, grads: s.grads, optimizer: s.optimizer, activations: act, total: s.params + s.grads + s.optimizer + act, host_optimizer: host };
  }

  function stepFlops(m, L) {
    const seq = seqLen(m, L), tokens = L.dp * L.micro_batch_size * nMicro(L) * seq;
    const flops = 3 * forwardFlopsPerToken(m, seq) * tokens;
    let extra = 0;
    if (isTransformer(m) && L.recompute === "full") extra = m.layers * (2 * matmulParams(m) + 4 * seq * m.hidden);
    else if (isTransformer(m) && L.recompute === "selective") extra = m.layers * 4 * seq * m.hidden;
    return [flops, flops + extra * tokens];
  }
  const link = (g, span) => (span <= g.gpus_per_node ? [g.nvlink_latency, g.nvlink_bandwidth] : [g.ib_latency, g.ib_bandwidth]);

  function stepTimes(m, L, g, numel) {
    const hw = stepFlops(m, L)[1], mm = nMicro(L), seq = seqLen(m, L);
    const peak = L.precision === "bf16" ? g.bf16_flops : g.fp32_flops;
    const compute = hw / gpusOf(L) / (peak * g.efficiency);
    let tp = 0;
    if (L.tp > 1 && isTransformer(m)) {
      const [, c, calls] = layerCost(m, L, fl((L.micro_batch_size * seq) / L.sp));
      const sent = L.tp_mode === "1d" ? ringAllreduce(c, L.tp) : c;
      const [a, bw] = link(g, L.tp);
      tp = layersPerStage(m, L) * mm * ((L.recompute === "full" ? 1.5 : 1) * (calls * a + sent / bw));
    }
    let cp = 0;
    if (L.sp > 1) {
      const chunk = fl((L.micro_batch_size * seq) / L.sp) * Math.max(fl(KV(m) / L.tp), 1) * headDim(m);
      const sent = 6 * (L.sp - 1) * chunk * elemBytes(L);
      const [a, bw] = link(g, L.tp * L.sp);
      const ring = layersPerStage(m, L) * mm * (sent / bw + a);
      const share = (4 * seq * m.hidden) / (forwardFlopsPerToken(m, seq) / m.layers);
      cp = Math.max(0, ring - share * compute);
    }
    const bubble = L.pp > 1 ? bubbleFraction(L.schedule, L.pp, mm, L.chunks) : 0;
    const pipelined = (compute + tp + cp) / (1 - bubble);
    let pp = 0;
    if (L.pp > 1) {
      const split = L.sequence_parallel || L.tp_mode !== "1d" ? L.tp : 1;
      const act = fl((fl((L.micro_batch_size * seq) / L.sp) * m.hidden * elemBytes(L)) / split);
      const [a, bw] = link(g, L.tp * L.sp * L.pp);
      pp = mm * ((act * (L.pp > 2 ? 2 : 1)) / bw + 2 * a);
    }
    let dp = 0;
    const n = L.dp * L.sp;
    if (n > 1) {
      const sent = zeroSentFactor(L.zero, n) * numel * STATE[L.precision][1];
      const [a, bw] = link(g, gpusOf(L));
      const comm = sent / bw + 2 * (n - 1) * a;
      dp = L.zero === 3 ? Math.max(0, comm * mm - compute) : Math.max(0, comm - ((2 / 3) * compute) / mm);
    }
    let off = 0;
    if (L.offload) off = (2 * (numel * 2)) / n / g.pcie_bandwidth;
    const terms = {
      compute, "tensor-parallel communication": tp, "context-parallel communication": cp,
      "pipeline bubble": pipelined - (compute + tp + cp), "pipeline p2p": pp,
      "data-parallel communication": dp, "offload (host link)": off,
    };
    return terms;
  }

  function validate(m, L) {
    gridShape(L.tp_mode, L.tp, L.tp_depth);
    if (L.global_batch != null && L.global_batch % (L.dp * L.micro_batch_size)) throw new Error(`a global batch of ${L.global_batch} does not split into dp=${L.dp} replicas of micro-batches of ${L.micro_batch_size}`);
    if (L.schedule === "interleaved" && L.pp > 1 && nMicro(L) % L.pp) throw new Error(`the interleaved schedule needs micro-batches (${nMicro(L)}) divisible by the pipeline size (${L.pp})`);
    if (!isTransformer(m)) {
      if (L.tp > 1 || L.pp > 1 || L.sp > 1) throw new Error(`${m.name} is not a transformer stack: only data parallelism and ZeRO are modeled for it`);
      return;
    }
    const split = L.tp_mode === "1d" ? L.tp : gridShape(L.tp_mode, L.tp, L.tp_depth).slice(-1)[0];
    for (const [what, v] of [["heads", m.heads], ["hidden", m.hidden], ["ffn", F(m)]])
      if (v % split) throw new Error(`${L.tp_mode.toUpperCase()} tensor parallelism splits ${what} into ${split} parts, but ${what}=${v} is not divisible by ${split}`);
    if (L.pp > m.layers) throw new Error(`pp=${L.pp} pipeline stages need at least ${L.pp} transformer blocks`);
    if (seqLen(m, L) % L.sp) throw new Error(`a sequence of ${seqLen(m, L)} tokens does not split over sp=${L.sp} ranks`);
  }

  function predict(m, g, L) {
    validate(m, L);
    const mem = memoryPerGpu(m, L);
    const out = { model: m.name, gpu: g.name, gpus: gpusOf(L), memory_per_gpu_bytes: mem, fits: mem.total <= g.hbm_bytes, step_time_s: null, tokens_per_s_per_gpu: null, mfu: null, bound: null, times_s: {} };
    if (forwardFlopsPerToken(m, seqLen(m, L)) == null) return out;
    const terms = stepTimes(m, L, g, paramsPerGpu(m, L));
    const step = Object.values(terms).reduce((x, y) => x + y, 0);
    const [flops, hw] = stepFlops(m, L);
    const tokens = L.dp * L.micro_batch_size * nMicro(L) * seqLen(m, L);
    const peak = L.precision === "bf16" ? g.bf16_flops : g.fp32_flops;
    let bound = null;
    for (const k of Object.keys(terms)) if (bound === null || terms[k] > terms[bound]) bound = k;
    return Object.assign(out, { step_time_s: step, tokens_per_s_per_gpu: tokens / step / gpusOf(L), mfu: flops / (step * gpusOf(L) * peak), hardware_flops_per_s_per_gpu: hw / (step * gpusOf(L)), bound, times_s: terms });
  }

  const api = { predict, memoryPerGpu, paramsPerGpu };
  if (typeof module !== "undefined") module.exports = api;
  root.caiScale = api;
})(typeof window !== "undefined" ? window : globalThis);
