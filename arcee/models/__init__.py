"""arcee.models"""
