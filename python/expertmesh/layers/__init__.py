"""Model building blocks: norms, rotary embeddings, paged attention, fused MoE.

No parallelism lives here; expert/tensor parallel variants wrap these layers elsewhere.
"""
