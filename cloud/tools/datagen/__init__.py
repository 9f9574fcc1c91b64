"""Generated multi-domain digit images, because no data set can be downloaded where ECOS is tested."""

from cloud.tools.datagen.digits import DOMAINS, generate, render

__all__ = ["DOMAINS", "generate", "render"]
