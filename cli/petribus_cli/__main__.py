from petribus_cli.main import main

main()
