# transformers decides whether it can read GGUF files by looking up this package's installed metadata.
from PyInstaller.utils.hooks import copy_metadata

datas = copy_metadata("gguf")
