"""Names of the worker's compute backends, importable without torch (the CLI offers them)."""

ATTENTION_BACKENDS = ("auto", "cpu", "cuda", "torch")
LINEAR_BACKENDS = ("auto", "blocks", "onednn", "torch")

ATTENTION_HELP = (
    "auto: our C++ kernels on a CPU (the torch reference, with a warning, where they cannot be built), "
    "the torch reference on a GPU; cpu: the C++ kernels; cuda: our CUDA kernels (opt-in until verified "
    "on a GPU); torch: the plain torch reference"
)
LINEAR_HELP = (
    "auto: blocks for a float32 model on a CPU where the C++ kernels build, else onednn there, else F.linear; "
    "blocks: oneDNN, and batches of up to 12 rows on the weights' own Q4_1/Q8_0 blocks wherever the float32 "
    "weights are exactly those (a GGUF's: same products, a sixth of the bytes); onednn: oneDNN with "
    "prepacked weights only; torch: F.linear"
)
KV_CACHE_DTYPE_HELP = (
    "element type of the KV pool: auto (the model's) | float32 | bfloat16 | float16 | int8. Under a float32 "
    "CPU model a 16-bit cache halves what attention reads and doubles the tokens the pool holds, at one "
    "rounding of each cached K/V value (float16 keeps more bits than bfloat16); int8 (a float32 scale per "
    "head row) reads 0.27x and holds 3.8x, at a quantization error of up to 1/254 of each row's largest value"
)
