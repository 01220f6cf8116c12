"""The student/teacher LM family (Llama, Qwen2, Qwen3), the BERT sentence encoder's network, shared layers and HF safetensors I/O."""
