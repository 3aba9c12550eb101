"""The S4D-VQ-VAE: S4D layers (`s4d`), quantizers (`quantizer`) and the model (`vqvae`)."""
