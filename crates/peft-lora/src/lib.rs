//! peft-lora
