"""Vision encoders: images [B,3,H,W] -> features [B,N,D] from a chosen hidden layer."""
