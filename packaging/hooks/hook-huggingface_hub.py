# peft writes a model card from huggingface_hub's Markdown template whenever it saves an adapter.
from PyInstaller.utils.hooks import collect_data_files

datas = collect_data_files("huggingface_hub")
