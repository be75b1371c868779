// The calculator page: read the form, call caiScale.predict, draw a stacked bar and the numbers.
(function () {
  "use strict";
  const P = window.caiScalePresets, form = document.getElementById("cai-calc-form");
  if (!form) return;
  const fill = (name, keys, chosen) => {
    const sel = form.elements[name];
    for (const k of keys) sel.add(new Option(k, k, false, k === chosen));
  };
  fill("model", Object.keys(P.models), "llama-3-70b");
  fill("gpu", Object.keys(P.gpus), "h100");
  const COLORS = { params: "#4c72b0", grads: "#dd8452", optimizer: "#55a868", activations: "#c44e52" };
  const GiB = 2 ** 30;

  function layout() {
    const f = form.elements, num = (k) => parseInt(f[k].value, 10);
    return {
      dp: num("dp"), tp: num("tp"), tp_mode: f.tp_mode.value, tp_depth: num("tp_depth"),
      pp: num("pp"), schedule: f.schedule.value, microbatches: null, chunks: num("chunks"),
      sp: num("sp"), zero: num("zero"), offload: f.offload.checked, recompute: f.recompute.value,
      precision: f.precision.value, micro_batch_size: num("micro_batch_size"),
      global_batch: num("global_batch"), seq: num("seq"), sequence_parallel: true,
    };
  }

  function draw() {
    const out = document.getElementById("cai-calc-out"), bar = document.getElementById("cai-calc-bar");
    const gpu = P.gpus[form.elements.gpu.value];
    try {
      const r = window.caiScale.predict(P.models[form.elements.model.value], gpu, layout());
      const m = r.memory_per_gpu_bytes, scale = Math.max(m.total, gpu.hbm_bytes);
      bar.innerHTML = Object.keys(COLORS).map((k) =>
        `<span title="${k}" style="display:inline-block;height:1.5em;background:${COLORS[k]};` +
        `width:${(100 * m[k]) / scale}%"></span>`).join("") +
        `<div style="font-size:80%">bar width: the larger of the total and the GPU's ` +
        `${(gpu.hbm_bytes / 1e9).toFixed(0)} GB</div>`;
      const lines = Object.keys(COLORS).map((k) => `${k.padEnd(12)} ${(m[k] / GiB).toFixed(2)} GiB`);
      lines.push(`${"total".padEnd(12)} ${(m.total / GiB).toFixed(2)} GiB ${r.fits ? "(fits)" : "(does not fit)"}`);
      if (r.step_time_s !== null) {
        lines.push(`step time    ${r.step_time_s.toFixed(3)} s, bound: ${r.bound}`);
        lines.push(`tokens/s/GPU ${r.tokens_per_s_per_gpu.toFixed(1)}   MFU ${(100 * r.mfu).toFixed(1)} %`);
      }
      out.textContent = lines.join("\n");
    } catch (e) {
      bar.innerHTML = "";
      out.textContent = "error: " + e.message;
    }
  }
  form.addEventListener("input", draw);
  draw();
})();
