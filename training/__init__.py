"""Everything numerical before serving: data ingestion and cleaning, tokenizer, models, the Ray Train loop."""
