"""Model implementations over the paged KV cache (`llama`: Llama, SmolLM2, Mistral, Qwen2)."""
