"""The dual-stream baseline as a variant of MCR: the reconstructions on the masked pass, the
contrastive loss on a second, unmasked pass per modality."""
from mcr.models.mcr import MCR


class DualStream(MCR):
    """MCR whose alignment reads an unmasked second pass instead of the masked features."""

    def masked_alignment(self, batch, latent, txt_tokens, labels):
        return self.unmasked_alignment(batch)
