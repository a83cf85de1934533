"""Super-resolution (``task=sr``, QuantSR): basicsr's EDSR / MSRResNet / SwinIR, PSNR / SSIM on Y."""
