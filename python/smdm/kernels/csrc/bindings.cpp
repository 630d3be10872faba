// bindings.cpp — pybind11 module of the smdm CUDA kernels (built by smdm.kernels on first use).
// The Python side (smdm.kernels) validates arguments, allocates outputs and registers torch.library ops.
#include <torch/extension.h>

void unmask_step_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& uncond, const at::Tensor& candidates,
                      const at::Tensor& seeds, int64_t step, int64_t pos_offset, double cfg_scale, double temperature,
                      int64_t top_k, double top_p, int64_t conf_mode, const c10::optional<at::Tensor>& n_commit,
                      double tau, at::Tensor tokens, at::Tensor pred, at::Tensor conf, at::Tensor committed);

void choose_tokens_cuda(const at::Tensor& logits, const at::Tensor& seeds, const at::Tensor& positions,
                        const at::Tensor& steps, double temperature, int64_t top_k, double top_p, int64_t conf_mode,
                        at::Tensor tokens, at::Tensor conf);

void select_positions_cuda(const at::Tensor& conf, const at::Tensor& candidates,
                           const c10::optional<at::Tensor>& n_commit, double tau, at::Tensor committed);

void flash_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& q_seg, const c10::optional<at::Tensor>& k_seg,
                          at::Tensor out, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "smdm CUDA kernels: fused unmasking sampler and bidirectional flash attention";
  m.def("unmask_step", &unmask_step_cuda, "fused unmasking step (writes tokens/pred/conf/committed in place)",
        py::arg("logits"), py::arg("uncond"), py::arg("candidates"), py::arg("seeds"), py::arg("step"),
        py::arg("pos_offset"), py::arg("cfg_scale"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("conf_mode"), py::arg("n_commit"), py::arg("tau"), py::arg("tokens"), py::arg("pred"),
        py::arg("conf"), py::arg("committed"));
  m.def("choose_tokens", &choose_tokens_cuda, "token and confidence per logits row (writes tokens/conf)",
        py::arg("logits"), py::arg("seeds"), py::arg("positions"), py::arg("steps"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("conf_mode"), py::arg("tokens"), py::arg("conf"));
  m.def("select_positions", &select_positions_cuda, "per-sequence commit choice (writes committed)",
        py::arg("conf"), py::arg("candidates"), py::arg("n_commit"), py::arg("tau"), py::arg("committed"));
  m.def("attention", &flash_attention_cuda, "bidirectional flash attention forward (writes out)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("q_seg"), py::arg("k_seg"), py::arg("out"), py::arg("scale"));
}
