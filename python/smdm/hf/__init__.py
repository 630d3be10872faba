"""The Hugging Face transformers code of smdm's masked diffusion model (`smdm convert to-hf` copies these files
next to the exported weights, loaded with `trust_remote_code=True`). They import torch and transformers only,
never smdm, and nothing here imports them: `import smdm` does not import transformers."""
