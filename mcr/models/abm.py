"""AbM (aggregate, then map) as a variant of MCR: the ablation of MbA's map-then-pool."""
import mcr_kernels
from mcr.models.mcr import MCR


class AbM(MCR):
    """MCR whose alignment pools the encoder tokens first, then maps the pooled token."""

    def pool(self, img_tokens, txt_tokens, txt_mask):
        return self.image_head(img_tokens.mean(1)), self.text_head(mcr_kernels.masked_mean(txt_tokens, txt_mask))
