//! The model engine (candle): LLaVA-1.5 modules, adapters, training and generation.
